"""The workers' KV event streams in Redis, both ends: a worker's publisher and a router's feed.

Each worker appends what its radix prefix cache stores and evicts (engine/radix_cache.py events) to
a Redis Stream of its own, "baton:kv_events:<worker_id>". A router reads every ready worker's stream
into its PrefixIndex (router/prefix_index.py), from the start of the stream when it first sees the
worker, so a router that restarts rebuilds the index by replaying.

Entries (field -> bytes):
    k   b"stored" | b"removed" | b"snapshot"
    h   the block hashes, packed as little-endian uint64
    bs  the block size in tokens (stored and snapshot)
A snapshot replaces everything the worker published before it. The publisher writes one, in the
same transaction that deletes the old stream, when it starts, when the engine dropped events it did
not drain in time, when a write failed (events were lost), when the stream vanished (Redis restarted
or the key expired), and when the stream grew past max_stream_len. The stream therefore always
starts with a snapshot (or a stored entry after an empty start), stays bounded, and replays into
exactly the worker's cache as of its last entry.

Losing Redis never stops serving (DESIGN §5): the publisher logs once and snapshots when Redis is
back; the feed clears the index (routing falls back to load only, see `lookup`), and rebuilds it by
replaying every stream from the start once reads succeed again.

Nothing here imports redis at import time; the classes take a client or a URL.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from engine.radix_cache import BlockRemoved, BlockStored, KVEvent, KVEventBatch
from router.prefix_index import PrefixAnswer, PrefixIndex
from router.registry import WorkerInfo

log = logging.getLogger(__name__)

STREAM_PREFIX = "baton:kv_events:"
DEFAULT_MAX_STREAM_LEN = 4096  # entries; past this the publisher compacts into a snapshot


def stream_key(worker_id: str) -> str:
    return STREAM_PREFIX + worker_id


def _pack(hashes: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def _unpack(raw: bytes) -> tuple[int, ...]:
    if len(raw) % 8:
        raise ValueError(f"packed hashes must be a multiple of 8 bytes, got {len(raw)}")
    return struct.unpack(f"<{len(raw) // 8}Q", raw)


def snapshot_entry(hashes: Sequence[int], block_size: int) -> dict[str, bytes]:
    return {"k": b"snapshot", "h": _pack(hashes), "bs": str(block_size).encode()}


def event_entries(events: Iterable[KVEvent], block_size: int) -> list[dict[str, bytes]]:
    """Stream entries for engine events; an AllBlocksCleared becomes an empty snapshot."""
    entries = []
    for event in events:
        if isinstance(event, BlockStored):
            entries.append({"k": b"stored", "h": _pack(event.block_hashes),
                            "bs": str(event.block_size).encode()})
        elif isinstance(event, BlockRemoved):
            entries.append({"k": b"removed", "h": _pack(event.block_hashes)})
        else:
            entries.append(snapshot_entry((), block_size))
    return entries


def apply_entry(index: PrefixIndex, worker_id: str, fields: dict[bytes, bytes]) -> None:
    """Apply one stream entry (as redis-py returns it: bytes keys). Raises ValueError if malformed."""
    kind = fields.get(b"k")
    hashes = _unpack(fields.get(b"h", b""))
    if kind == b"removed":
        index.removed(worker_id, hashes)
        return
    if kind not in (b"stored", b"snapshot"):
        raise ValueError(f"unknown entry kind {kind!r}")
    try:
        block_size = int(fields[b"bs"])
    except (KeyError, ValueError):
        raise ValueError(f"{kind.decode()} entry without a valid block size") from None
    if kind == b"stored":
        index.stored(worker_id, hashes, block_size)
    else:
        index.replace(worker_id, hashes, block_size)


# ---------------------------------------------------------------------------- the worker's end


class KVEventPublisher:
    """Drains a worker's engine every interval_s and appends to its stream, on a daemon thread.

    drain(snapshot) is the worker's `kv_event_batch` (baton/worker.py): the engine's events since
    the last drain, with the whole cache's hashes when `snapshot` is true.
    """

    def __init__(self, redis: Any, worker_id: str, drain: Callable[[bool], KVEventBatch], *,
                 interval_s: float = 0.1, check_interval_s: float = 1.0,
                 max_stream_len: int = DEFAULT_MAX_STREAM_LEN, ttl_s: float = 60.0) -> None:
        if interval_s <= 0 or check_interval_s <= 0 or ttl_s <= 0:
            raise ValueError("interval_s, check_interval_s and ttl_s must be > 0")
        if max_stream_len <= 0:
            raise ValueError(f"max_stream_len must be > 0, got {max_stream_len}")
        self._redis = redis
        self.worker_id = worker_id
        self.key = stream_key(worker_id)
        self._drain = drain
        self._interval_s, self._check_interval_s = interval_s, check_interval_s
        self._max_stream_len = max_stream_len
        self._ttl_ms = int(ttl_s * 1000)
        self._need_snapshot = True  # the first write replaces whatever an earlier life left
        self._num_dropped = 0
        self._last_check = 0.0
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.worker_id}-kv-events",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop publishing and delete the stream (best effort: it expires anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        try:
            self._redis.delete(self.key)
        except Exception as exc:  # noqa: BLE001 - Redis down: the key's TTL removes it
            log.warning("worker %s: could not delete its KV event stream: %s", self.worker_id, exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.publish_once()
            except Exception as exc:  # noqa: BLE001 - Redis down or the engine stopping
                self._need_snapshot = True  # what was drained is lost: resync when it works
                if not self._failing:
                    self._failing = True
                    log.warning("worker %s: publishing KV events failed (%s: %s); routing to it "
                                "is load-only until it works again", self.worker_id,
                                type(exc).__name__, exc)

    def publish_once(self) -> None:
        """One drain and write; raises on a Redis error (the caller retries with a snapshot)."""
        batch = self._drain(self._need_snapshot)
        if batch.num_dropped != self._num_dropped and batch.snapshot is None:
            self._num_dropped = batch.num_dropped  # events were lost in the engine: resync now
            batch = self._drain(True)
        self._num_dropped = batch.num_dropped
        pipe = self._redis.pipeline(transaction=True)
        if batch.snapshot is not None:
            pipe.delete(self.key)
            pipe.xadd(self.key, snapshot_entry(batch.snapshot, batch.block_size))
            pipe.pexpire(self.key, self._ttl_ms)
            pipe.execute()
            self._need_snapshot = False
            self._last_check = time.monotonic()
        else:
            entries = event_entries(batch.events, batch.block_size)
            now = time.monotonic()
            if not entries and now - self._last_check < self._check_interval_s:
                return
            pipe.exists(self.key)
            for entry in entries:
                pipe.xadd(self.key, entry)
            pipe.pexpire(self.key, self._ttl_ms)
            pipe.xlen(self.key)
            results = pipe.execute()
            self._last_check = now
            existed, length = results[0], results[-1]
            # Gone (Redis restarted, or the key expired): what the router replays is incomplete.
            # Too long: compact. Either way the next write is a snapshot.
            self._need_snapshot = not existed or length > self._max_stream_len
        if self._failing:
            self._failing = False
            log.info("worker %s: KV events reach Redis again", self.worker_id)


# ---------------------------------------------------------------------------- the router's end


class RedisPrefixIndexFeed:
    """Reads the ready workers' streams into a PrefixIndex on a daemon thread.

    `workers` gives the current worker list (the router's WorkerDirectory). `lookup` answers from
    the index, or None while the streams cannot be read: routing is then load-only.
    """

    def __init__(self, redis_url: str, workers: Callable[[], list[WorkerInfo]], *,
                 block_ms: int = 100, retry_interval_s: float = 0.5,
                 socket_timeout_s: float = 2.0) -> None:
        import redis

        if block_ms <= 0 or retry_interval_s <= 0:
            raise ValueError("block_ms and retry_interval_s must be > 0")
        self.redis_url = redis_url
        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                            socket_connect_timeout=socket_timeout_s)
        self._workers = workers
        self._block_ms = block_ms
        self._retry_interval_s = retry_interval_s
        self.index = PrefixIndex()
        self._last_ids: dict[str, bytes] = {}  # worker id -> the last entry id applied
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.healthy = False
        self._outage_logged = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kv-index-feed", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self._client.close()

    def lookup(self, token_ids: Sequence[int], worker_ids: Iterable[str]) -> PrefixAnswer | None:
        """The index's answer for a prompt, or None while the index is unavailable."""
        with self._lock:
            if not self.healthy:
                return None
            return self.index.lookup(token_ids, worker_ids)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except self._errors as exc:
                if not self._outage_logged:
                    self._outage_logged = True
                    log.warning("KV event streams at %s unreadable, routing on load only until "
                                "they are back: %s", self.redis_url, exc)
                with self._lock:
                    self.healthy = False
                    self.index.clear()
                    self._last_ids.clear()  # replay every stream from its start once back
                self._stop.wait(self._retry_interval_s)

    def poll(self) -> int:
        """Wait up to block_ms for new entries on every ready worker's stream and apply them;
        returns how many were applied. Raises the Redis client's errors."""
        ids = [w.worker_id for w in self._workers() if w.state == "ready"]
        with self._lock:
            self.index.retain(ids)
            self._last_ids = {w: self._last_ids.get(w, b"0") for w in ids}
            streams = {stream_key(w): self._last_ids[w] for w in ids}
        if not streams:
            self._client.ping()  # still learn whether Redis is there
            self._set_healthy()
            self._stop.wait(self._block_ms / 1000)
            return 0
        replies = self._client.xread(streams, count=1000, block=self._block_ms) or []
        applied = 0
        with self._lock:
            for key, entries in replies:
                worker_id = (key.decode() if isinstance(key, bytes) else key)[len(STREAM_PREFIX):]
                if worker_id not in self._last_ids:
                    continue
                for entry_id, fields in entries:
                    try:
                        apply_entry(self.index, worker_id, fields)
                        applied += 1
                    except ValueError as exc:
                        log.warning("worker %s: skipping malformed KV event %s: %s", worker_id,
                                    entry_id, exc)
                    self._last_ids[worker_id] = entry_id
        self._set_healthy()
        return applied

    def _set_healthy(self) -> None:
        if self._outage_logged:
            self._outage_logged = False
            log.info("KV event streams at %s readable again: the index is rebuilt by replaying",
                     self.redis_url)
        with self._lock:
            self.healthy = True
