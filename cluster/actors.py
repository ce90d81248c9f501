"""Thin Ray actor shells around the components: a worker (prefill or decode) and the router.

These are plain classes; the launcher turns them into Ray actors with
`ray.remote(cls).options(num_cpus=..., num_gpus=...)`, so the components never see Ray and these
shells can be exercised in-process as well.

Worker actor lifecycle:
    __init__ (cheap: stores settings) -> start() (loads the model, binds gRPC, serves Prometheus
    metrics on a port of its own, registers "ready" in Redis, starts heartbeats) -> heartbeat every
    interval (renews the lease, refreshes load) -> drain(grace) (state "draining" so routers stop
    sending, worker.stop(grace), deregister, metrics server down).
A failed heartbeat (Redis gone) is logged and retried next interval: losing Redis never stops a
worker from serving (DESIGN §5); the lease expires and the entry comes back with the next success.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from typing import Any

from engine.config import EngineConfig

log = logging.getLogger(__name__)

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _configure_logging() -> None:
    """Actors are fresh processes: give their log lines a format (Ray forwards them)."""
    root = logging.getLogger()
    if not any(getattr(h, "_baton", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        handler._baton = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def node_address() -> str:
    """This node's IP as Ray sees it (multi-node), else the host name."""
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return socket.gethostname()


def _advertised(host: str, port: int) -> str:
    """host:port that others can dial: a wildcard bind is advertised with the node's IP."""
    if host in ("0.0.0.0", "::", ""):
        host = node_address()
    return f"{host}:{port}"


class WorkerActor:
    """Hosts one PrefillWorker or DecodeWorker; `role` is set by the subclasses below."""

    role = ""

    def __init__(
        self,
        *,
        worker_id: str,
        engine_config: EngineConfig,
        model_name: str,
        redis_url: str,
        host: str = "127.0.0.1",
        heartbeat_interval_s: float = 2.0,
        lease_ttl_s: float = 10.0,
        kv_compression: str = "none",  # prefill workers: how KV goes on the wire
        kv_shared_memory: bool = True,  # prefill workers: rings to same-host decode workers
        cluster_token: str | None = None,  # internal calls carry it (baton/cluster_token.py)
        cluster_tls: Any = None,  # baton.cluster_tls.ClusterTLS: mutual TLS; None = plaintext
    ) -> None:
        self.worker_id = worker_id
        self.engine_config = engine_config
        self.model_name = model_name
        self.redis_url = redis_url
        self.host = host
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lease_ttl_s = lease_ttl_s
        self.kv_compression = kv_compression
        self.kv_shared_memory = kv_shared_memory
        self.cluster_token = cluster_token
        self.cluster_tls = cluster_tls
        self.worker: Any = None
        self.info: Any = None  # router.registry.WorkerInfo once registered
        self._redis: Any = None
        self._metrics_server: Any = None
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._info_lock = threading.Lock()
        self._kv_events: Any = None  # router.kv_events.KVEventPublisher, with a prefix cache

    def make_worker(self) -> Any:
        """The component this actor hosts (tests override this with a stand-in)."""
        options: dict[str, Any] = {}
        if self.role == "prefill":
            from prefill_worker.server import PrefillWorker as cls

            options["kv_compression"] = self.kv_compression
            options["kv_shared_memory"] = self.kv_shared_memory
        else:
            from decode_worker.server import DecodeWorker as cls
        return cls(self.engine_config, worker_id=self.worker_id, model_name=self.model_name,
                   host=self.host, port=0, cluster_token=self.cluster_token,
                   tls=self.cluster_tls, **options)

    def start(self) -> dict:
        """Load, bind, register; returns the registry entry as a dict."""
        import redis
        from prometheus_client import start_http_server

        from router.registry import WorkerInfo, register_worker

        _configure_logging()
        t0 = time.monotonic()
        if self.engine_config.enable_prefix_caching:  # the routers' prefix index reads them
            self.engine_config = dataclasses.replace(self.engine_config, enable_kv_events=True)
        self.worker = self.make_worker()
        self.worker.start()
        grpc_port = int(self.worker.address.rsplit(":", 1)[1])
        self._metrics_server, _ = start_http_server(0, addr=self.host, registry=self.worker.registry)
        metrics_port = self._metrics_server.server_port
        self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)
        now = time.time()
        self.info = WorkerInfo(
            worker_id=self.worker_id,
            role=self.role,
            state="ready",
            grpc_address=_advertised(self.host, grpc_port),
            metrics_url=f"http://{_advertised(self.host, metrics_port)}/metrics",
            pid=os.getpid(),
            node=node_address(),
            started_at=now,
            updated_at=now,
        )
        self._refresh_load()
        self._start_kv_events()
        register_worker(self._redis, self.info, self.lease_ttl_s)
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name=f"{self.worker_id}-heartbeat", daemon=True)
        self._heartbeat_thread.start()
        log.info("%s worker %s ready in %.1f s: gRPC %s, metrics %s", self.role, self.worker_id,
                 time.monotonic() - t0, self.info.grpc_address, self.info.metrics_url)
        return self.describe()

    def ping(self) -> int:
        return os.getpid()

    def _start_kv_events(self) -> None:
        """Publish the prefix cache's events to this worker's stream (router/kv_events.py)."""
        from router.kv_events import KVEventPublisher

        if not self.engine_config.enable_prefix_caching:
            return
        self._kv_events = KVEventPublisher(self._redis, self.worker_id,
                                           self.worker.kv_event_batch,
                                           ttl_s=max(60.0, 6 * self.lease_ttl_s))
        self._kv_events.publish_once()  # the first snapshot before the worker takes traffic
        self._kv_events.start()

    def describe(self) -> dict:
        with self._info_lock:
            return dataclasses.asdict(self.info) if self.info is not None else {}

    def _refresh_load(self) -> None:
        load = self.worker.load()
        with self._info_lock:
            self.info = dataclasses.replace(
                self.info, num_running=load.num_running, num_waiting=load.num_waiting,
                kv_usage=load.kv_usage, updated_at=time.time())

    def heartbeat_once(self) -> None:
        from router.registry import heartbeat

        self._refresh_load()
        with self._info_lock:
            info = self.info
        heartbeat(self._redis, info, self.lease_ttl_s)

    def _heartbeat_loop(self) -> None:
        failing = False
        while not self._stop_heartbeat.wait(self.heartbeat_interval_s):
            try:
                self.heartbeat_once()
                if failing:
                    log.info("worker %s: heartbeats to Redis work again", self.worker_id)
                failing = False
            except Exception as exc:  # noqa: BLE001 - Redis down or anything else: keep serving
                if not failing:
                    log.warning("worker %s: heartbeat failed (%s: %s); still serving, retrying "
                                "every %.1f s", self.worker_id, type(exc).__name__, exc,
                                self.heartbeat_interval_s)
                failing = True

    def drain(self, grace_s: float = 5.0) -> None:
        """Stop taking requests, finish in-flight ones (up to grace_s), leave the registry."""
        from redis.exceptions import RedisError

        from router.registry import deregister, heartbeat

        if self.info is None:
            return
        with self._info_lock:
            self.info = dataclasses.replace(self.info, state="draining", updated_at=time.time())
            info = self.info
        try:
            heartbeat(self._redis, info, self.lease_ttl_s)
        except (RedisError, OSError) as exc:
            log.warning("worker %s: could not mark itself draining: %s", self.worker_id, exc)
        self._stop_heartbeat.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=self.heartbeat_interval_s + 5)
        self.worker.stop(grace_s)
        if self._kv_events is not None:
            self._kv_events.close()
            self._kv_events = None
        try:
            deregister(self._redis, self.worker_id)
        except (RedisError, OSError) as exc:
            log.warning("worker %s: could not deregister (the lease will expire): %s",
                        self.worker_id, exc)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._redis is not None:
            self._redis.close()
        self.info = None
        log.info("%s worker %s drained", self.role, self.worker_id)


class PrefillWorkerActor(WorkerActor):
    role = "prefill"


class DecodeWorkerActor(WorkerActor):
    role = "decode"


class RouterActor:
    """Hosts one router.server.Router over the Redis worker directory."""

    def __init__(self, *, router_config: Any, redis_url: str) -> None:
        self.router_config = router_config
        self.redis_url = redis_url
        self.router: Any = None

    def start(self) -> dict:
        from router.kv_events import RedisPrefixIndexFeed
        from router.registry import RedisWorkerDirectory
        from router.server import Router

        _configure_logging()
        directory = RedisWorkerDirectory(self.redis_url)
        self.router = Router(self.router_config, directory,
                             RedisPrefixIndexFeed(self.redis_url, directory.workers))
        self.router.start()
        host = self.router_config.host
        return {
            "http_address": _advertised(host, self.router.http_port),
            "grpc_address": _advertised(host, self.router.grpc_port),
            "pid": os.getpid(),
        }

    def ping(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
