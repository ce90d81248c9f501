"""The shell both worker roles share: an engine on its EngineLoop, a gRPC server with the health
service, the worker's Prometheus metrics, and a graceful stop.

Lifecycle: construct (loads the model, allocates the KV pool) -> start() (engine thread, then the
server binds; `address` is known) -> stop(grace) (health NOT_SERVING, in-flight RPCs get `grace`
seconds, then the engine loop stops). Subclasses add their services in `_add_services`.

main() runs one worker as a process of its own (`python -m prefill_worker`, `python -m
decode_worker`): it builds the worker the way the cluster's actors do, serves its Prometheus
metrics, prints one line `READY grpc=<host:port> metrics=<url>` on stdout once both serve, and
stops gracefully on SIGTERM or SIGINT. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from baton.cluster_tls import ClusterTLS
from baton.cluster_tls import from_env as cluster_tls_from_env
from baton.cluster_token import TokenCheck
from baton.cluster_token import from_env as cluster_token_from_env
from baton.metrics import WorkerMetrics
from baton.v1 import worker_pb2
from baton.wire import GRPC_OPTIONS
from engine.config import EngineConfig
from engine.loop import EngineLoop, WorkerLoad
from engine.radix_cache import KVEventBatch
from kvtransfer.compression import COMPRESSIONS

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
        cluster_token: str | None = None,
        tls: ClusterTLS | None = None,
    ) -> None:
        """cluster_token: internal calls to this worker must carry it, and its own calls to
        other workers do (baton/cluster_token.py); None: no check. tls: serve, and call other
        workers, over mutual TLS (baton/cluster_tls.py); None: plaintext."""
        from engine.engine import LLMEngine  # torch: only where a worker really starts

        self.worker_id = worker_id
        self.model_name = model_name
        self.cluster_token = cluster_token
        self.tls = tls
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
            interceptors=[TokenCheck(cluster_token)] if cluster_token else None,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._add_services(self._server)
        self.address = ""
        self.pid = os.getpid()

    def _add_services(self, server: grpc.Server) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.loop.start()
        address = f"{self.host}:{self._port}"
        port = (self._server.add_insecure_port(address) if self.tls is None
                else self._server.add_secure_port(address, self.tls.server_credentials()))
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

    def kv_event_batch(self, snapshot: bool = False) -> KVEventBatch:
        """The prefix cache's events since the last call (LLMEngine.kv_event_batch), taken on
        the engine thread between two steps."""
        return self.loop.call(self.engine.kv_event_batch, snapshot)


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


# -- one worker as a process ---------------------------------------------------------------------

_ROLE_HELP = {
    "prefill": "Baton prefill worker: computes prompts and pushes their KV to decode workers.",
    "decode": "Baton decode worker: receives KV (or prefills locally) and generates tokens.",
}


def _ranged(kind: type, low: float, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


def build_parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {role}_worker", description=_ROLE_HELP[role],
        epilog="Once serving, prints one line to stdout: READY grpc=<host:port> metrics=<url>. "
               "SIGTERM or SIGINT stops it gracefully (in-flight RPCs get --grace-s seconds). "
               "With BATON_CLUSTER_TOKEN set, it serves only calls that carry that token, and "
               "sends it with its own calls to other workers. With BATON_TLS_CA, BATON_TLS_CERT "
               "and BATON_TLS_KEY set (PEM files), it serves over mutual TLS and calls other "
               "workers the same way (baton/cluster_tls.py).")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="HF model directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--model-name", default=None,
                        help="model label on the metrics (default: the directory's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind the gRPC and metrics servers (default %(default)s)")
    parser.add_argument("--port", type=_ranged(int, 0, 65535), default=0,
                        help="gRPC port; 0 = pick a free one (default %(default)s)")
    parser.add_argument("--metrics-port", type=_ranged(int, 0, 65535), default=0,
                        help="Prometheus /metrics port; 0 = pick a free one (default %(default)s)")
    parser.add_argument("--worker-id", default=None,
                        help=f"id on metrics and logs (default: {role}-<pid>)")
    parser.add_argument("--kv-cache-memory-bytes", type=_ranged(int, 1), default=1 << 30,
                        help="KV pool size in bytes; the number of blocks follows from it "
                             "(default %(default)s)")
    parser.add_argument("--threads", type=_ranged(int, 1), default=None,
                        help="torch threads (default: torch's own choice)")
    parser.add_argument("--max-num-batched-tokens", type=_ranged(int, 1),
                        default=EngineConfig.max_num_batched_tokens,
                        help="token budget of one engine step; longer prompts are prefilled in "
                             "chunks of it (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto, float32, bfloat16 or float16 (default auto: float32 on CPU, "
                             "bfloat16 on CUDA)")
    parser.add_argument("--grace-s", type=_ranged(float, 0.0), default=5.0,
                        help="seconds in-flight RPCs get on SIGTERM (default %(default)s)")
    if role == "decode":
        parser.add_argument("--kv-lease-s", type=_ranged(float, 0.001), default=30.0,
                            help="seconds a remote-prefill reservation waits for its KV before "
                                 "its blocks are freed and the request fails (default %(default)s)")
    else:
        parser.add_argument("--kv-chunk-bytes", type=_ranged(int, 1), default=1 << 20,
                            help="approximate payload bytes of one KV chunk pushed to a decode "
                                 "worker in the gRPC stream (default %(default)s)")
        parser.add_argument("--kv-ring-slot-bytes", type=_ranged(int, 1), default=None,
                            help="bytes of one slot of a shared-memory ring: the largest KV "
                                 "chunk pushed through it (default: 4 MiB)")
        parser.add_argument("--no-kv-shared-memory", dest="kv_shared_memory",
                            action="store_false",
                            help="push KV in the gRPC stream even to a decode worker on this "
                                 "host (by default, with --kv-compression none, such pushes go "
                                 "through shared memory in /dev/shm)")
        parser.add_argument("--kv-compression", choices=COMPRESSIONS, default="none",
                            help="KV on the wire: none (exact) or int8 (about a quarter of "
                                 "float32's bytes, lossy; docs/architecture.md) "
                                 "(default %(default)s)")
    return parser


def main(role: str, worker_cls: Callable[[], type[WorkerServer]],
         argv: Sequence[str] | None = None) -> int:
    """Serve one `role` worker until SIGTERM or SIGINT; returns the exit status.

    worker_cls() imports and returns the worker class, only once the arguments parsed (--help
    and argument errors answer without loading torch)."""
    from prometheus_client import start_http_server

    parser = build_parser(role)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_config = EngineConfig(
            model=args.model, device=args.device, dtype=args.dtype,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes, num_threads=args.threads,
            max_num_batched_tokens=args.max_num_batched_tokens)
    except ValueError as exc:
        parser.error(str(exc))
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model must be an HF model directory with a config.json, got {args.model}")
    if role == "decode":
        role_options = {"kv_lease_s": args.kv_lease_s}
    else:
        role_options = {"kv_chunk_bytes": args.kv_chunk_bytes,
                        "kv_compression": args.kv_compression,
                        "kv_shared_memory": args.kv_shared_memory}
        if args.kv_ring_slot_bytes is not None:
            role_options["kv_ring_slot_bytes"] = args.kv_ring_slot_bytes
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker = worker_cls()(engine_config, worker_id=args.worker_id or f"{role}-{os.getpid()}",
                        model_name=args.model_name or Path(args.model).name, host=args.host,
                        port=args.port, cluster_token=cluster_token_from_env(),
                        tls=cluster_tls_from_env(),
                        **role_options)
    worker.start()
    metrics_server, _ = start_http_server(args.metrics_port, addr=args.host,
                                          registry=worker.registry)
    print(f"READY grpc={worker.address} "
          f"metrics=http://{args.host}:{metrics_server.server_port}/metrics", flush=True)
    while not stop.wait(0.5):
        pass
    log.info("%s worker %s: stopping (grace %.1f s)", role, worker.worker_id, args.grace_s)
    worker.stop(args.grace_s)
    metrics_server.shutdown()
    metrics_server.server_close()
    return 0
