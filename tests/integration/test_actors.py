"""The worker actor shell, in-process (no Ray) with a stand-in worker and a real Redis: it
registers, serves its metrics, heartbeats (renewing the lease, refreshing load), survives a Redis
outage, and drains."""

from __future__ import annotations

import os
import time

import httpx
import pytest
import redis

from cluster.redis_server import RedisServer
from engine.config import EngineConfig
from router.registry import list_workers
from tests.support.cluster_fakes import FakeDecodeActor, FakePrefillActor
from tests.support.redis import redis_server  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.integration


def make_actor(cls, url: str, worker_id: str = "decode-0", **kw):
    return cls(worker_id=worker_id, engine_config=EngineConfig(model="/unused"),
               model_name="fake-model", redis_url=url, heartbeat_interval_s=0.1,
               lease_ttl_s=kw.pop("lease_ttl_s", 0.5), **kw)


def registered(url: str) -> list:
    client = redis.Redis.from_url(url)
    try:
        return list_workers(client)
    finally:
        client.close()


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_start_registers_ready_with_addresses(redis_server):  # noqa: F811
    actor = make_actor(FakeDecodeActor, redis_server.url)
    try:
        info = actor.start()
        assert info["worker_id"] == "decode-0" and info["role"] == "decode"
        assert info["state"] == "ready"
        assert info["grpc_address"] == actor.worker.address
        assert info["pid"] == os.getpid()
        assert info["node"]
        (entry,) = registered(redis_server.url)
        assert entry.grpc_address == actor.worker.address
        assert entry.metrics_url == info["metrics_url"]
        metrics = httpx.get(info["metrics_url"], timeout=5)
        assert metrics.status_code == 200
        assert 'baton_num_requests_running{model="fake-model",role="decode",worker="decode-0"}' \
            in metrics.text
    finally:
        actor.drain(0.1)


def test_heartbeats_keep_the_lease_and_refresh_load(redis_server):  # noqa: F811
    actor = make_actor(FakePrefillActor, redis_server.url, worker_id="prefill-0")
    try:
        actor.start()
        first = registered(redis_server.url)[0].num_running
        time.sleep(1.0)  # twice the lease: only heartbeats keep the entry
        (entry,) = registered(redis_server.url)
        assert entry.role == "prefill"
        assert entry.num_running > first + 3  # refreshed at every heartbeat
        assert (entry.num_waiting, entry.kv_usage) == (1, 0.5)
    finally:
        actor.drain(0.1)


def test_drain_marks_draining_stops_the_worker_and_deregisters(redis_server):  # noqa: F811
    actor = make_actor(FakeDecodeActor, redis_server.url, lease_ttl_s=5)
    actor.start()
    worker, metrics_url = actor.worker, actor.info.metrics_url
    seen_states = []
    original_stop = worker.stop

    def stop(grace):  # what the registry says while the worker finishes its requests
        seen_states.extend(w.state for w in registered(redis_server.url))
        original_stop(grace)

    worker.stop = stop
    actor.drain(2.5)
    assert seen_states == ["draining"]
    assert worker.stopped_with_grace == 2.5
    assert registered(redis_server.url) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(metrics_url, timeout=1)
    actor.drain(1.0)  # twice is harmless


def test_worker_keeps_serving_through_a_redis_outage():
    server = RedisServer()
    server.start()
    port = server.port
    actor = make_actor(FakeDecodeActor, server.url, lease_ttl_s=0.5)
    try:
        actor.start()
        server.stop()
        time.sleep(0.5)  # heartbeats fail meanwhile
        assert actor._heartbeat_thread.is_alive()
        server = RedisServer(port=port)  # Redis comes back empty...
        server.start()
        # ...and the next heartbeat writes the entry again
        assert wait_until(lambda: [w.worker_id for w in registered(server.url)] == ["decode-0"])
    finally:
        actor.drain(0.1)
        server.stop()
