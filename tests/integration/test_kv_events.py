"""The global prefix index end to end over a real Redis: worker actors (with stand-in workers
whose radix cache the test fills) publish their KV events, a router's feed reads them into its
index; a restarted feed replays; a Redis outage turns routing load-only and the index recovers
once Redis is back (empty)."""

from __future__ import annotations

import time

import pytest
import redis

from cluster.redis_server import RedisServer
from engine.config import EngineConfig
from router.kv_events import KVEventPublisher, RedisPrefixIndexFeed, stream_key
from router.registry import RedisWorkerDirectory
from tests.support.cluster_fakes import FakeDecodeActor, FakePrefillActor
from tests.support.redis import redis_server  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.integration

A = list(range(1000, 1016))  # 4 blocks of 4
B = list(range(2000, 2012))  # 3 blocks


def make_actor(cls, url: str, worker_id: str):
    return cls(worker_id=worker_id, engine_config=EngineConfig(model="/unused"),
               model_name="fake-model", redis_url=url, heartbeat_interval_s=0.1,
               lease_ttl_s=1.0)


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def feed_for(url: str) -> tuple[RedisWorkerDirectory, RedisPrefixIndexFeed]:
    directory = RedisWorkerDirectory(url, poll_interval_s=0.1)
    directory.start()
    feed = RedisPrefixIndexFeed(url, directory.workers, block_ms=50, retry_interval_s=0.1)
    feed.start()
    return directory, feed


def cached(feed, token_ids, worker_ids):
    """Cached prefix tokens per worker, or None while the feed answers nothing (load-only)."""
    answer = feed.lookup(token_ids, worker_ids)
    return None if answer is None else answer.cached_tokens


def close(directory, feed) -> None:
    feed.close()
    directory.close()


def test_index_follows_stores_and_evictions_and_replays_after_a_restart(redis_server):  # noqa: F811
    d0 = make_actor(FakeDecodeActor, redis_server.url, "decode-0")
    p0 = make_actor(FakePrefillActor, redis_server.url, "prefill-0")
    d0.start()
    p0.start()
    directory, feed = feed_for(redis_server.url)
    try:
        d0.worker.cache(A)
        p0.worker.cache(B)
        ids = ["decode-0", "prefill-0"]
        assert wait_until(lambda: cached(feed, A, ids) == {"decode-0": 16, "prefill-0": 0})
        assert cached(feed, B, ids) == {"decode-0": 0, "prefill-0": 12}
        assert cached(feed, A[:10] + [1, 2, 3, 4], ids) == {"decode-0": 8, "prefill-0": 0}
        # a router that starts now replays the streams into the same index
        directory2, feed2 = feed_for(redis_server.url)
        try:
            assert wait_until(lambda: cached(feed2, B, ids) == {"decode-0": 0, "prefill-0": 12})
            assert cached(feed2, A, ids) == {"decode-0": 16, "prefill-0": 0}
        finally:
            close(directory2, feed2)
        d0.worker.evict_all()
        assert wait_until(lambda: cached(feed, A, ids) == {"decode-0": 0, "prefill-0": 0})
        # a drained worker leaves the index and its stream goes away
        p0.drain(0.1)
        assert wait_until(lambda: cached(feed, B, ["prefill-0"]) == {})
        assert not redis.Redis.from_url(redis_server.url).exists(stream_key("prefill-0"))
    finally:
        close(directory, feed)
        d0.drain(0.1)
        p0.drain(0.1)


def test_stream_stays_bounded_and_replays_exactly(redis_server):  # noqa: F811
    actor = make_actor(FakeDecodeActor, redis_server.url, "decode-0")
    actor.start()
    actor._kv_events.close()  # drive a publisher of our own, one write at a time
    client = redis.Redis.from_url(redis_server.url)
    publisher = KVEventPublisher(client, "decode-0", actor.worker.kv_event_batch,
                                 max_stream_len=5)
    try:
        publisher.publish_once()  # the opening snapshot
        prompts = [list(range(100 * i, 100 * i + 8)) for i in range(1, 12)]
        for prompt in prompts:
            actor.worker.cache(prompt)
            publisher.publish_once()
            assert client.xlen(stream_key("decode-0")) <= 6  # 5, then one more, then compacted
        directory, feed = feed_for(redis_server.url)
        try:
            assert wait_until(lambda: cached(feed, prompts[0], ["decode-0"]) == {"decode-0": 8})
            assert all(cached(feed, p, ["decode-0"]) == {"decode-0": 8} for p in prompts)
        finally:
            close(directory, feed)
    finally:
        client.close()
        actor.drain(0.1)


def test_dropped_events_are_replaced_by_a_snapshot(redis_server):  # noqa: F811
    actor = make_actor(FakeDecodeActor, redis_server.url, "decode-0")
    actor.start()
    actor._kv_events.close()
    cache = actor.worker.prefix_cache
    cache._events = type(cache._events)(maxlen=1)  # a tiny buffer: the second event drops the first
    client = redis.Redis.from_url(redis_server.url)
    publisher = KVEventPublisher(client, "decode-0", actor.worker.kv_event_batch)
    try:
        publisher.publish_once()
        actor.worker.cache(A)
        actor.worker.cache(B)
        assert cache.num_dropped_events == 1
        publisher.publish_once()
        (entry,) = [fields for _, fields in client.xrange(stream_key("decode-0"))]
        assert entry[b"k"] == b"snapshot" and len(entry[b"h"]) == 8 * 7  # A's 4 + B's 3
    finally:
        client.close()
        actor.drain(0.1)


def test_redis_outage_makes_routing_load_only_and_the_index_recovers():
    server = RedisServer()
    server.start()
    port = server.port
    actor = make_actor(FakeDecodeActor, server.url, "decode-0")
    actor.start()
    directory, feed = feed_for(server.url)
    try:
        actor.worker.cache(A)
        assert wait_until(lambda: cached(feed, A, ["decode-0"]) == {"decode-0": 16})
        server.stop()
        assert wait_until(lambda: cached(feed, A, ["decode-0"]) is None)  # load-only
        actor.worker.cache(B)  # cached during the outage: its events cannot be written
        time.sleep(0.3)
        server = RedisServer(port=port)  # Redis comes back empty
        server.start()
        # the publisher notices the missing stream and snapshots; the feed replays it
        assert wait_until(lambda: cached(feed, B, ["decode-0"]) == {"decode-0": 12})
        assert cached(feed, A, ["decode-0"]) == {"decode-0": 16}
    finally:
        close(directory, feed)
        actor.drain(0.1)
        server.stop()
