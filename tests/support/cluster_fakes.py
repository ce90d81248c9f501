"""Stand-ins for the components cluster/ hosts, so the actor shells and the launcher can be tested
with a real Redis and a real Ray runtime but without models.

- FakeWorker keeps the worker-shell contract (start/stop/load/registry/address/role) and listens
  on a real TCP port; its load grows by one at every load() call, so heartbeats are observable.
- FakePrefillActor / FakeDecodeActor host a FakeWorker in the real WorkerActor shell.
- FakeRouterActor answers GET /health and GET /cluster (the registry as JSON) like the router.
- FailingDecodeActor fails at start, like a worker whose model cannot load.
Ray imports these by module name, so the Ray workers need the repository on PYTHONPATH.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry

from baton.metrics import WorkerMetrics
from cluster.actors import DecodeWorkerActor, PrefillWorkerActor
from engine.loop import WorkerLoad
from engine.radix_cache import KVEventBatch, RadixCache


class FakeWorker:
    def __init__(self, role: str, worker_id: str, host: str = "127.0.0.1") -> None:
        self.role = role
        self.worker_id = worker_id
        self.host = host
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry, "fake-model", role, worker_id)
        self.address = ""
        self.num_load_calls = 0
        self.stopped_with_grace: float | None = None
        self._socket: socket.socket | None = None
        self.prefix_cache = RadixCache(4, enable_events=True)  # see cache() and evict()
        self._cache_lock = threading.Lock()  # the real worker's engine thread, in miniature

    def cache(self, token_ids: list[int]) -> None:
        """Cache token_ids' full blocks (block ids drawn fresh) as an engine would."""
        with self._cache_lock:
            first = max(self.prefix_cache.parents(), default=-1) + 1
            self.prefix_cache.insert(token_ids, range(first, first + len(token_ids) // 4))

    def evict_all(self) -> None:
        with self._cache_lock:
            while self.prefix_cache.num_cached_blocks:
                parents = self.prefix_cache.parents()
                self.prefix_cache.evict([b for b in parents if self.prefix_cache.is_leaf(b)])

    def kv_event_batch(self, snapshot: bool = False) -> KVEventBatch:
        with self._cache_lock:
            return self.prefix_cache.take_event_batch(snapshot)

    def start(self) -> None:
        self._socket = socket.socket()
        self._socket.bind((self.host, 0))
        self._socket.listen()
        self.address = f"{self.host}:{self._socket.getsockname()[1]}"

    def stop(self, grace: float = 5.0) -> None:
        self.stopped_with_grace = grace
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def load(self) -> WorkerLoad:
        self.num_load_calls += 1
        self.metrics.num_requests_running.set(self.num_load_calls)
        return WorkerLoad(num_running=self.num_load_calls, num_waiting=1, kv_usage=0.5,
                          num_free_blocks=50, num_total_blocks=100)


class FakePrefillActor(PrefillWorkerActor):
    def make_worker(self) -> FakeWorker:
        return FakeWorker(self.role, self.worker_id, self.host)


class FakeDecodeActor(DecodeWorkerActor):
    def make_worker(self) -> FakeWorker:
        return FakeWorker(self.role, self.worker_id, self.host)


class FailingDecodeActor(DecodeWorkerActor):
    def make_worker(self) -> FakeWorker:
        raise ValueError(f"model directory {self.engine_config.model} has no config.json")


class FakeRouterActor:
    """GET /health -> 200; GET /cluster -> {"workers": [registry entries]}."""

    def __init__(self, *, router_config, redis_url: str) -> None:
        self.router_config = router_config
        self.redis_url = redis_url
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> dict:
        import redis

        from router.registry import list_workers

        client = redis.Redis.from_url(self.redis_url)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    body = b'{"status": "ok"}'
                elif self.path == "/cluster":
                    workers = [dataclasses.asdict(w) for w in list_workers(client)]
                    body = json.dumps({"workers": workers}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        cfg = self.router_config
        self.server = ThreadingHTTPServer((cfg.host, cfg.http_port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return {"http_address": f"{cfg.host}:{self.server.server_port}",
                "grpc_address": f"{cfg.host}:{cfg.grpc_port}", "pid": os.getpid()}

    def ping(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
