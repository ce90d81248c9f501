"""The worker registry: who serves, where, and how loaded. Workers write it; routers read it.

Key schema: "baton:workers:<worker_id>" -> WorkerInfo as JSON, set with a TTL (the lease, default
10 s). A worker registers when it starts, heartbeats every ~2 s (renewing the lease and refreshing
its load fields), switches its state to "draining" before it stops, and deregisters. A worker that
dies simply stops heartbeating and its key expires. A heartbeat after expiry (e.g. Redis restarted)
re-creates the key, so the registry rebuilds itself.

Routers read through a WorkerDirectory: RedisWorkerDirectory polls Redis in a background thread
(~1 s) and serves the last list it read, so losing Redis never stops serving;
StaticWorkerDirectory holds a fixed list (tests, single-process setups).

The functions take a `redis.Redis` client; this module does not import redis at import time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

KEY_PREFIX = "baton:workers:"
DEFAULT_TTL_S = 10.0
ROLES = ("prefill", "decode")
STATES = ("starting", "ready", "draining")


def worker_key(worker_id: str) -> str:
    return KEY_PREFIX + worker_id


@dataclass
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode"
    state: str  # "starting" | "ready" | "draining"
    grpc_address: str  # host:port
    metrics_url: str  # http://host:port/metrics
    pid: int
    node: str  # host name or Ray node id
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {self.state!r}")

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerInfo:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("a worker entry must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})  # newer writers may add keys


def _ttl_ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    return max(1, int(ttl_s * 1000))


def register_worker(redis: Any, info: WorkerInfo, ttl_s: float = DEFAULT_TTL_S) -> None:
    """Write the worker's entry with a fresh lease."""
    info.updated_at = time.time()
    redis.set(worker_key(info.worker_id), info.to_json(), px=_ttl_ms(ttl_s))


def heartbeat(redis: Any, info: WorkerInfo, ttl_s: float = DEFAULT_TTL_S) -> bool:
    """Renew the lease and publish the current load fields of `info`.

    Returns False when the lease had already expired (the entry is written again either way).
    """
    info.updated_at = time.time()
    pipe = redis.pipeline()
    pipe.exists(worker_key(info.worker_id))
    pipe.set(worker_key(info.worker_id), info.to_json(), px=_ttl_ms(ttl_s))
    existed, _ = pipe.execute()
    return bool(existed)


def deregister(redis: Any, worker_id: str) -> None:
    redis.delete(worker_key(worker_id))


def list_workers(redis: Any) -> list[WorkerInfo]:
    """Every live entry, sorted by worker_id. Malformed entries are logged and skipped."""
    keys = sorted(redis.scan_iter(match=KEY_PREFIX + "*", count=500))
    if not keys:
        return []
    workers = []
    for key, raw in zip(keys, redis.mget(keys)):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            workers.append(WorkerInfo.from_json(raw))
        except (ValueError, TypeError) as exc:
            log.warning("skipping malformed registry entry %r: %s", key, exc)
    workers.sort(key=lambda w: w.worker_id)
    return workers


class WorkerDirectory(Protocol):
    """What the router reads: the last known workers, without blocking."""

    def start(self) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    def close(self) -> None: ...


class StaticWorkerDirectory:
    """A fixed list of workers (tests, single-process deployments). set() replaces it."""

    def __init__(self, workers: Sequence[WorkerInfo] = ()) -> None:
        self._workers = list(workers)
        self._lock = threading.Lock()

    def start(self) -> None:
        pass

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return list(self._workers)

    def set(self, workers: Sequence[WorkerInfo]) -> None:
        with self._lock:
            self._workers = list(workers)

    def close(self) -> None:
        pass


class RedisWorkerDirectory:
    """Polls the registry every `poll_interval_s` on a daemon thread; keeps the last good list.

    While Redis is unreachable the last list is served as is (routing degrades to stale load
    numbers); one warning is logged when the outage starts and one info line when it ends. A Redis
    that comes back may have lost every entry (a restart without persistence) until each worker's
    next heartbeat writes it again: for `recovery_grace_s` after an outage, workers of the last
    list that the registry does not show yet are still served, so that no request finds "no
    worker" in between. A worker that really died meanwhile fails its next call, which the router
    retries elsewhere.
    """

    def __init__(self, redis_url: str, poll_interval_s: float = 1.0,
                 socket_timeout_s: float = 1.0, recovery_grace_s: float = DEFAULT_TTL_S) -> None:
        import redis

        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s}")
        self.redis_url = redis_url
        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                            socket_connect_timeout=socket_timeout_s)
        self._poll_interval_s = poll_interval_s
        self._workers: list[WorkerInfo] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.healthy = False  # the last poll succeeded
        self._outage_logged = False
        self._recovery_grace_s = recovery_grace_s
        self._recovering_until: float | None = None  # monotonic; see the class docstring
        self.last_success_at: float | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self.poll()  # a first list before the router takes requests
        self._thread = threading.Thread(target=self._run, name="worker-directory", daemon=True)
        self._thread.start()

    def poll(self) -> bool:
        """Read the registry once; True on success."""
        try:
            workers = list_workers(self._client)
        except self._errors as exc:  # keep serving the last list
            if not self._outage_logged:
                self._outage_logged = True
                log.warning("worker registry at %s unreachable, routing on the last known %d "
                            "workers: %s", self.redis_url, len(self.workers()), exc)
            self.healthy = False
            return False
        now = time.monotonic()
        if self._outage_logged:
            self._outage_logged = False
            self._recovering_until = now + self._recovery_grace_s
            log.info("worker registry at %s reachable again", self.redis_url)
        if self._recovering_until is not None:
            if now < self._recovering_until:
                listed = {w.worker_id for w in workers}
                workers = sorted([*workers, *(w for w in self.workers()
                                              if w.worker_id not in listed)],
                                 key=lambda w: w.worker_id)
            else:
                self._recovering_until = None
        with self._lock:
            self._workers = workers
        self.healthy = True
        self.last_success_at = time.time()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._poll_interval_s):
            self.poll()

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return list(self._workers)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._client.close()
