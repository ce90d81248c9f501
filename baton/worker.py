"""The shell both worker roles share: an engine on its EngineLoop, a gRPC server with the health
service, the worker's Prometheus metrics, and a graceful stop.

Lifecycle: construct (loads the model, allocates the KV pool) -> start() (engine thread, then the
server binds; `address` is known) -> stop(grace) (health NOT_SERVING, in-flight RPCs get `grace`
seconds, then the engine loop stops). Subclasses add their services in `_add_services`.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from baton.metrics import WorkerMetrics
from baton.v1 import worker_pb2
from baton.wire import GRPC_OPTIONS
from engine.config import EngineConfig
from engine.loop import EngineLoop, WorkerLoad

log = logging.getLogger(__name__)


class WorkerServer:
    role = ""  # "prefill" or "decode"
    service_names: tuple[str, ...] = ()

    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        worker_id: str,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        max_concurrent_rpcs: int = 256,
    ) -> None:
        from engine.engine import LLMEngine  # torch: only where a worker really starts

        self.worker_id = worker_id
        self.model_name = model_name
        self.host = host
        self._port = port
        self.engine = LLMEngine(engine_config)
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry, model_name, self.role, worker_id)
        self.metrics.track_engine_stats(lambda: self.engine.stats)
        self.loop = EngineLoop(
            self.engine, name=f"{self.role}-engine", on_step=self.metrics.observe_step
        )
        self.metrics.num_requests_running.set_function(lambda: self.loop.load().num_running)
        self.metrics.num_requests_waiting.set_function(lambda: self.loop.load().num_waiting)
        self.metrics.kv_cache_usage_ratio.set_function(lambda: self.loop.load().kv_usage)
        self._health = health.HealthServicer()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_concurrent_rpcs,
                                       thread_name_prefix=f"{self.role}-rpc"),
            options=GRPC_OPTIONS,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._add_services(self._server)
        self.address = ""
        self.pid = os.getpid()

    def _add_services(self, server: grpc.Server) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.loop.start()
        port = self._server.add_insecure_port(f"{self.host}:{self._port}")
        if port == 0:
            raise RuntimeError(f"{self.role} worker could not bind {self.host}:{self._port}")
        self._server.start()
        self.address = f"{self.host}:{port}"
        for name in ("", *self.service_names):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s worker %s serving on %s (%d KV blocks)", self.role, self.worker_id,
                 self.address, self.engine.num_total_blocks)

    def stop(self, grace: float = 5.0) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.loop.stop()
        log.info("%s worker %s stopped", self.role, self.worker_id)

    def load(self) -> WorkerLoad:
        return self.loop.load()


def abort_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception a worker hands back to the router."""
    from engine.request import InvalidRequestError, NoCapacityError

    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NoCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def load_to_proto(load: WorkerLoad) -> worker_pb2.Load:
    return worker_pb2.Load(
        num_running=load.num_running, num_waiting=load.num_waiting, kv_usage=load.kv_usage,
        num_free_blocks=load.num_free_blocks, num_total_blocks=load.num_total_blocks)
