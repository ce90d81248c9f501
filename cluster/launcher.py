"""`baton serve`: bring a whole cluster up, print where it listens, take it down on a signal.

Start-up order (each step logs its progress):
    1. resolve the model once, in the driver (a GGUF is dequantized into the cache the first time,
       30-60 s; afterwards instant): every actor then loads the same HF directory;
    2. Redis: an embedded redis-server on a free loopback port, unless redis_url is set;
    3. Ray: a local runtime sized so every actor fits even on a 2-core machine, unless ray_address;
    4. actors: prefill and decode workers and the router, started concurrently; the first failure
       aborts the start with that actor's error;
    5. wait until every worker is registered "ready" in Redis and the router answers /health.
Shutdown (Ctrl-C, SIGTERM, or a failed start), each step bounded in time and independent of the
others: stop the router, drain the workers, kill the actors, ray.shutdown(), stop Redis.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.actors import DecodeWorkerActor, PrefillWorkerActor, RouterActor
from cluster.config import ClusterConfig
from cluster.redis_server import RedisServer, RedisServerError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


class ClusterStartError(RuntimeError):
    """The cluster could not come up; the message says which part failed and why."""


@dataclass
class Endpoints:
    """Where a running cluster listens (what the banner prints)."""

    model_name: str
    model_dir: str
    http_url: str
    grpc_address: str
    redis_url: str
    redis_embedded: bool
    workers: list[dict] = field(default_factory=list)  # registry entries as dicts


def served_model_name(model: str) -> str:
    """The name clients use in requests: the spec itself, or a path's last component."""
    path = Path(model)
    if model.endswith(".gguf"):
        return path.stem
    if os.sep in model or path.is_dir():
        return path.resolve().name
    return model


class Cluster:
    """One cluster's lifetime: start() brings it up (or raises ClusterStartError after cleaning
    up), stop() takes it down and is safe to call at any point, twice included."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        model_dir: str | None = None,  # an already resolved HF directory (skips resolve_model)
        startup_timeout_s: float = 600.0,
        drain_grace_s: float = 5.0,
        actor_classes: dict[str, type] | None = None,  # role -> class; tests pass stand-ins
    ) -> None:
        self.config = config
        self.model_dir = model_dir
        self.startup_timeout_s = startup_timeout_s
        self.drain_grace_s = drain_grace_s
        self.actor_classes = {
            "prefill": PrefillWorkerActor, "decode": DecodeWorkerActor, "router": RouterActor,
            **(actor_classes or {}),
        }
        self.redis_server: RedisServer | None = None
        self.redis_url: str | None = config.redis_url
        self.router_actor: Any = None
        self.worker_actors: dict[str, Any] = {}  # worker_id -> actor handle
        self.endpoints: Endpoints | None = None
        self._ray_started = False
        self._stopped = False
        # every internal call carries it (baton/cluster_token.py): this cluster's, drawn now
        self.cluster_token = secrets.token_urlsafe(32)

    # ---- start ----------------------------------------------------------------------------

    def start(self) -> Endpoints:
        try:
            return self._start()
        except ClusterStartError as exc:
            log.error("%s", exc)  # before the shutdown's lines, which it explains
            self.stop()
            raise
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Endpoints:
        cfg = self.config
        t0 = time.monotonic()
        if self.model_dir is None:
            self.model_dir = self._resolve_model()
        with _children_ignore_sigint():
            self._start_redis()
            self._init_ray()
        router_info = self._start_actors()
        self._wait_registered()
        http_url = f"http://{router_info['http_address']}"
        self._wait_router_healthy(http_url)
        self.endpoints = Endpoints(
            model_name=served_model_name(cfg.model),
            model_dir=str(self.model_dir),
            http_url=http_url,
            grpc_address=router_info["grpc_address"],
            redis_url=self.redis_url or "",
            redis_embedded=self.redis_server is not None,
            workers=self._list_workers(),
        )
        log.info("cluster up in %.1f s", time.monotonic() - t0)
        return self.endpoints

    def _resolve_model(self) -> str:
        from engine.weights import resolve_model

        cache_dir = Path(self.config.model_cache_dir) if self.config.model_cache_dir else None
        log.info("resolving model %r (the first time a GGUF is converted, this takes 30-60 s)",
                 self.config.model)
        t0 = time.monotonic()
        try:
            model_dir = resolve_model(self.config.model, cache_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise ClusterStartError(f"model {self.config.model!r}: {exc}") from exc
        log.info("model ready at %s (%.1f s)", model_dir, time.monotonic() - t0)
        return str(model_dir)

    def _start_redis(self) -> None:
        if self.redis_url is not None:
            log.info("using Redis at %s", self.redis_url)
            return
        self.redis_server = RedisServer()
        try:
            self.redis_server.start()
        except RedisServerError as exc:
            raise ClusterStartError(str(exc)) from exc
        self.redis_url = self.redis_server.url
        log.info("embedded Redis at %s", self.redis_url)

    def _init_ray(self) -> None:
        import ray

        cfg = self.config
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # ray.init replaces SIGTERM's handler with sys.exit; keep ours (the launcher's).
        previous = signal.getsignal(signal.SIGTERM) if _on_main_thread() else None
        self._ray_started = True  # from here on stop() calls ray.shutdown(), harmless if unneeded
        try:
            if cfg.ray_address is not None:
                log.info("connecting to Ray at %s", cfg.ray_address)
                ray.init(address=cfg.ray_address, namespace="baton", logging_level=logging.WARNING)
            else:
                num_cpus = max(os.cpu_count() or 1, math.ceil(cfg.num_requested_cpus))
                log.info("starting a local Ray runtime (%d logical CPUs)", num_cpus)
                ray.init(
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    namespace="baton",
                    logging_level=logging.WARNING,
                    object_store_memory=128 * 2**20,  # we move no objects through Ray
                )
        except Exception as exc:  # Ray raises many kinds; all of them end the start
            where = cfg.ray_address or "a local Ray runtime"
            raise ClusterStartError(f"could not start {where}: {type(exc).__name__}: {exc}") from exc
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if cfg.ray_address is None:
            have = ray.cluster_resources().get("GPU", 0)
            if cfg.num_requested_gpus > have:
                raise ClusterStartError(
                    f"the config asks for {cfg.num_requested_gpus:g} GPUs "
                    f"(prefill.num_gpus x prefill.count + decode.num_gpus x decode.count) but "
                    f"this machine has {have:g}; set num_gpus: 0 to run on the CPU"
                )

    def _start_actors(self) -> dict:
        import ray

        cfg = self.config
        suffix = secrets.token_hex(2)
        starts: dict[Any, str] = {}  # ObjectRef -> what it is
        for pool in (cfg.prefill, cfg.decode):
            cls = ray.remote(self.actor_classes[pool.role])
            for i in range(pool.count):
                worker_id = f"{pool.role}-{i}-{suffix}"
                actor = cls.options(
                    name=f"baton-{worker_id}", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
                    max_restarts=0,
                ).remote(**self._worker_actor_args(pool, worker_id))
                self.worker_actors[worker_id] = actor
                starts[actor.start.remote()] = f"{pool.role} worker {worker_id}"
        self.router_actor = ray.remote(self.actor_classes["router"]).options(
            name=f"baton-router-{suffix}", num_cpus=cfg.router.num_cpus, max_restarts=0,
        ).remote(router_config=self._router_config(), redis_url=self.redis_url)
        router_ref = self.router_actor.start.remote()
        starts[router_ref] = "router"
        log.info("starting %d prefill worker(s), %d decode worker(s) and the router",
                 cfg.prefill.count, cfg.decode.count)
        results = self._wait_all(starts)
        return results[router_ref]

    def _worker_actor_args(self, pool: Any, worker_id: str) -> dict:
        """The keyword arguments of one worker actor of pool (a WorkerPoolConfig)."""
        cfg = self.config
        return {
            "worker_id": worker_id,
            "engine_config": pool.engine_config(str(self.model_dir)),
            "model_name": served_model_name(cfg.model),
            "redis_url": self.redis_url,
            "host": pool.host,
            "heartbeat_interval_s": cfg.heartbeat_interval_s,
            "lease_ttl_s": cfg.lease_ttl_s,
            "kv_compression": cfg.kvtransfer.compression,
            "kv_shared_memory": cfg.kvtransfer.shared_memory,
            "cluster_token": self.cluster_token,
            "cluster_tls": cfg.tls.cluster_tls(),
        }

    def _router_config(self) -> Any:
        from router.auth import read_keys_file
        from router.config import RouterConfig

        r = self.config.router
        return RouterConfig(
            host=r.host, http_port=r.http_port, grpc_port=r.grpc_port,
            model_name=served_model_name(self.config.model), model_dir=str(self.model_dir),
            request_timeout_s=r.request_timeout_s, routing=r.routing(),
            max_inflight_requests=r.max_inflight_requests,
            api_keys=tuple(read_keys_file(r.api_keys_file)) if r.api_keys_file else (),
            cluster_token=self.cluster_token, cluster_tls=self.config.tls.cluster_tls(),
        )

    def _wait_all(self, starts: dict[Any, str]) -> dict[Any, Any]:
        """Wait for every start() call; fail fast with the first error."""
        import ray

        pending = list(starts)
        results: dict[Any, Any] = {}
        deadline = time.monotonic() + self.startup_timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(starts[r] for r in pending)
                raise ClusterStartError(
                    f"not started within {self.startup_timeout_s:.0f} s: {names}. If Ray reports "
                    "pending actors, the cluster lacks the CPUs/GPUs the config asks for"
                )
            done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 5.0))
            for ref in done:
                try:
                    results[ref] = ray.get(ref)
                except Exception as exc:
                    cause = _cause(exc)
                    if "address already in use" in cause.lower():
                        cause += (" (another process holds that port: choose others with "
                                  "--http-port / --grpc-port, or 0 for any free port)")
                    raise ClusterStartError(f"{starts[ref]} failed to start: {cause}") from exc
                log.info("%s started", starts[ref])
        return results

    def _redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)

    def _list_workers(self) -> list[dict]:
        import dataclasses

        from router.registry import list_workers

        client = self._redis_client()
        try:
            return [dataclasses.asdict(w) for w in list_workers(client)]
        finally:
            client.close()

    def _wait_registered(self, timeout_s: float = 30.0) -> None:
        expected = set(self.worker_actors)
        deadline = time.monotonic() + timeout_s
        while True:
            ready = {w["worker_id"] for w in self._list_workers() if w["state"] == "ready"}
            if expected <= ready:
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"workers not registered as ready in Redis within {timeout_s:.0f} s: "
                    f"{', '.join(sorted(expected - ready))}"
                )
            time.sleep(0.1)

    def _wait_router_healthy(self, http_url: str, timeout_s: float = 60.0) -> None:
        """/health answers 200 and /cluster lists every worker (the router polls the registry)."""
        import httpx

        expected = set(self.worker_actors)
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"{http_url}/health", timeout=2.0)
                if health.status_code != 200:
                    last = f"/health answered HTTP {health.status_code}: {health.text[:200]}"
                else:
                    payload = httpx.get(f"{http_url}/cluster", timeout=2.0).json()
                    seen = {w.get("id", w.get("worker_id")) for w in payload.get("workers", [])}
                    if expected <= seen:
                        return
                    last = f"/cluster does not list {', '.join(sorted(expected - seen))} yet"
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise ClusterStartError(f"the router at {http_url} did not become ready: {last}")

    def dead_components(self, timeout_s: float = 10.0) -> list[str]:
        """Names of the actors that died since the start (a crash, the OOM killer, a lost node)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        actors = {"router": self.router_actor} if self.router_actor is not None else {}
        actors.update({f"worker {wid}": a for wid, a in self.worker_actors.items()})
        refs = {name: actor.ping.remote() for name, actor in actors.items()}
        dead = []
        for name, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
            except RayActorError:
                dead.append(name)
            except GetTimeoutError:  # busy or slow, not known to be dead
                pass
        return dead

    # ---- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        log.info("shutting down")
        if self._ray_started:
            self._stop_actors()
            self._shutdown_ray()
        if self.redis_server is not None:
            _best_effort("stopping Redis", self.redis_server.stop)
            self.redis_server = None
        log.info("shut down")

    def _stop_actors(self) -> None:
        import ray

        if self.router_actor is not None:
            _best_effort("stopping the router",
                         lambda: ray.get(self.router_actor.stop.remote(), timeout=15))
        refs = [a.drain.remote(self.drain_grace_s) for a in self.worker_actors.values()]
        if refs:
            _best_effort("draining the workers",
                         lambda: ray.get(refs, timeout=self.drain_grace_s + 15))
        for actor in [self.router_actor, *self.worker_actors.values()]:
            if actor is not None:
                _best_effort("killing an actor", lambda a=actor: ray.kill(a, no_restart=True))
        self.router_actor = None
        self.worker_actors.clear()

    def _shutdown_ray(self) -> None:
        import ray

        _best_effort("shutting Ray down", ray.shutdown)
        self._ray_started = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started meanwhile (Redis, Ray's daemons, and through the raylet the actors)
    inherit SIGINT as ignored: a terminal's Ctrl-C reaches the whole foreground process group,
    and only the launcher should act on it, by draining everything in order."""
    if not _on_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _cause(exc: BaseException) -> str:
    """The user-facing part of a Ray error: the original exception, not Ray's wrapping."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if cause is not None and cause is not exc:
        return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _best_effort(what: str, fn: Any) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever one step raised
        log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)


# ---- serve --------------------------------------------------------------------------------------


WATCH_INTERVAL_S = 5.0


class _Shutdown(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM; unwinds start() or the wait."""


def banner(endpoints: Endpoints) -> str:
    e = endpoints
    lines = [
        f"Baton is serving {e.model_name}",
        f"  HTTP (OpenAI API)  {e.http_url}/v1",
        f"  gRPC               {e.grpc_address}  (baton.v1.Generation)",
        f"  cluster            {e.http_url}/cluster   (or: baton status --url {e.http_url})",
        f"  Redis              {e.redis_url}{'  (embedded)' if e.redis_embedded else ''}",
        f"  metrics            {e.http_url}/metrics  (router)",
    ]
    for w in sorted(e.workers, key=lambda w: (w["role"] != "prefill", w["worker_id"])):
        lines.append(f"                     {w['metrics_url']}  ({w['role']} {w['worker_id']}, "
                     f"gRPC {w['grpc_address']}, pid {w['pid']})")
    lines += [
        "Try:",
        f"  curl -s {e.http_url}/v1/chat/completions -H 'Content-Type: application/json' \\",
        (f"    -d '{{\"model\": \"{e.model_name}\", \"messages\": "
         "[{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}'"),
        f"  baton chat --grpc-address {e.grpc_address} \"What is the capital of France?\"",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


def serve(config: ClusterConfig, *, model_dir: str | None = None) -> int:
    """Run a cluster until SIGINT/SIGTERM; returns the process exit code."""

    def on_signal(signum: int, frame: object) -> None:
        raise _Shutdown(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = Cluster(config, model_dir=model_dir)
    try:
        endpoints = cluster.start()
        print(banner(endpoints), flush=True)
        reported: set[str] = set()
        while True:  # until a signal raises _Shutdown
            time.sleep(WATCH_INTERVAL_S)
            for name in sorted(set(cluster.dead_components()) - reported):
                log.error("%s died; the cluster goes on without it (restart `baton serve` to "
                          "replace it)", name)
                reported.add(name)
    except _Shutdown as sig:
        log.info("received %s", sig)
        return 0
    except ClusterStartError:  # Cluster.start logged it
        return 1
    finally:
        for s in previous:  # a second Ctrl-C must not interrupt the orderly shutdown
            signal.signal(s, signal.SIG_IGN)
        cluster.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.stdout.flush()
