"""Router: the HTTP API (FastAPI on uvicorn) and the gRPC API (grpc.aio) on one asyncio loop,
running on a background thread.

Lifecycle: Router(config, directory) loads the tokenizer and the model's context length ->
start() (directory polling starts, both servers bind, port 0 picks a free port; returns once both
accept connections; .http_port / .grpc_port are then known) -> stop() (health NOT_SERVING, open
requests are aborted on their workers, both servers close within graceful_shutdown_s, the
directory stops polling). A Router is started at most once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from baton.metrics import RouterMetrics
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.registry import WorkerDirectory
from router.service import GenerationService

if TYPE_CHECKING:
    from typing import Self

    from router.kv_events import RedisPrefixIndexFeed

log = logging.getLogger(__name__)


class Router:
    def __init__(self, config: RouterConfig, directory: WorkerDirectory,
                 prefix_index: RedisPrefixIndexFeed | None = None) -> None:
        """prefix_index: the workers' KV event feed (router/kv_events.py), started and closed
        with the router; None: routing on load only."""
        self.config = config
        self.directory = directory
        self.prefix_index = prefix_index
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        model_config = ModelConfig.from_dir(config.model_dir)
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        vocab_size = max(model_config.vocab_size, self.tokenizer.vocab_size)
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry, config.model_name)
        self.service = GenerationService(
            config, self.tokenizer, directory, self.metrics, self.max_model_len, vocab_size,
            prefix_lookup=prefix_index.lookup if prefix_index is not None else None)
        self.http_port = 0
        self.grpc_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._started = False

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host()}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self._client_host()}:{self.grpc_port}"

    def _client_host(self) -> str:
        host = self.config.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def _advertised_host(self) -> str:
        if self.config.advertise_host:
            return self.config.advertise_host
        if self.config.host in ("0.0.0.0", "::"):
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:
                return "127.0.0.1"
        return self.config.host

    def start(self, timeout_s: float = 30.0) -> None:
        if self._started:
            raise RuntimeError("a Router can be started only once")
        self._started = True
        self.directory.start()
        if self.prefix_index is not None:
            self.prefix_index.start()
        ready: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="router",
                                        daemon=True)
        self._thread.start()
        ready.result(timeout_s)  # re-raises a bind failure
        log.info("router for %s serving HTTP on %s:%d and gRPC on %s:%d (context %d tokens)",
                 self.config.model_name, self.config.host, self.http_port, self.config.host,
                 self.grpc_port, self.max_model_len)

    def _run(self, ready: Future) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.exception("router loop failed")
        finally:
            loop.close()

    async def _serve(self, ready: Future) -> None:
        import uvicorn
        from grpc_health.v1 import health_pb2

        from router.grpc_api import SERVICE_NAME, create_server
        from router.http_api import create_app

        self._stopped = asyncio.Event()
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.http_port))
        sock.listen(1024)
        self.http_port = sock.getsockname()[1]
        grpc_server, self.grpc_port, health = create_server(self.service, self.config.host,
                                                            self.config.grpc_port)
        app = create_app(self.service, self.directory,
                         lambda: [f"{self._advertised_host()}:{self.http_port}"])
        http = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning",
                                             access_log=False, timeout_graceful_shutdown=max(
                                                 1, int(self.config.graceful_shutdown_s))))
        await grpc_server.start()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        http_task = asyncio.create_task(http.serve(sockets=[sock]))
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        if http_task.done():
            await grpc_server.stop(0)
            http_task.result()
            raise RuntimeError("the router's HTTP server stopped while starting")
        ready.set_result(None)

        await self._stopped.wait()
        grace = self.config.graceful_shutdown_s
        await health.enter_graceful_shutdown()
        http.should_exit = True  # stop accepting; open requests get `grace` seconds
        grpc_stop = asyncio.create_task(grpc_server.stop(grace))
        _, pending = await asyncio.wait([http_task, grpc_stop], timeout=grace + 5)
        if pending:
            log.warning("the router's servers did not stop within %.1f s", grace + 5)
        await self.service.close()  # aborts what is left on the workers, closes channels
        sock.close()

    def stop(self) -> None:
        if self.prefix_index is not None:
            self.prefix_index.close()
        if self._loop is None or self._thread is None:
            self.directory.close()
            return
        if self._stopped is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=self.config.graceful_shutdown_s + 15)
        if self._thread.is_alive():
            log.warning("the router thread did not stop in time")
        self.directory.close()
        log.info("router stopped")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
