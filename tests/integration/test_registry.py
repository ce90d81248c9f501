"""The Redis worker registry against a real redis-server: leases expire, heartbeats renew them and
refresh the load, deregistering removes the entry, and the router's directory follows."""

from __future__ import annotations

import time

import pytest
import redis

from router.registry import (
    RedisWorkerDirectory,
    WorkerInfo,
    deregister,
    heartbeat,
    list_workers,
    register_worker,
    worker_key,
)
from tests.support.redis import redis_url  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.integration


def info(worker_id: str = "decode-0", **kw) -> WorkerInfo:
    values = {"worker_id": worker_id, "role": "decode", "state": "ready",
              "grpc_address": "127.0.0.1:1", "metrics_url": "http://127.0.0.1:2/metrics",
              "pid": 123, "node": "n1"}
    values.update(kw)
    return WorkerInfo(**values)


@pytest.fixture
def client(redis_url):  # noqa: F811
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_register_and_list(client):
    register_worker(client, info("decode-0"), ttl_s=10)
    register_worker(client, info("prefill-0", role="prefill"), ttl_s=10)
    workers = list_workers(client)
    assert [(w.worker_id, w.role, w.state) for w in workers] == [
        ("decode-0", "decode", "ready"), ("prefill-0", "prefill", "ready")]
    assert workers[0].grpc_address == "127.0.0.1:1" and workers[0].pid == 123


def test_lease_expires_without_heartbeats(client):
    register_worker(client, info(), ttl_s=0.3)
    assert [w.worker_id for w in list_workers(client)] == ["decode-0"]
    time.sleep(0.5)
    assert list_workers(client) == []


def test_heartbeats_renew_the_lease_and_refresh_load(client):
    worker = info()
    register_worker(client, worker, ttl_s=0.4)
    for i in range(4):  # 0.8 s in all: twice the lease
        time.sleep(0.2)
        worker.num_running, worker.kv_usage = i, i / 10
        assert heartbeat(client, worker, ttl_s=0.4) is True
    (seen,) = list_workers(client)
    assert (seen.num_running, seen.kv_usage) == (3, 0.3)
    assert 0 < client.pttl(worker_key("decode-0")) <= 400


def test_heartbeat_after_expiry_registers_again(client):
    worker = info()
    register_worker(client, worker, ttl_s=0.2)
    time.sleep(0.35)
    assert list_workers(client) == []
    assert heartbeat(client, worker, ttl_s=5) is False
    assert [w.worker_id for w in list_workers(client)] == ["decode-0"]


def test_draining_then_deregister(client):
    worker = info()
    register_worker(client, worker, ttl_s=10)
    worker.state = "draining"
    heartbeat(client, worker, ttl_s=10)
    assert [w.state for w in list_workers(client)] == ["draining"]
    deregister(client, "decode-0")
    assert list_workers(client) == []


def test_directory_follows_the_registry(redis_url, client):  # noqa: F811
    directory = RedisWorkerDirectory(redis_url, poll_interval_s=0.1)
    directory.start()
    try:
        assert directory.workers() == []
        register_worker(client, info(), ttl_s=0.5)
        deadline = time.monotonic() + 5
        while not directory.workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [w.worker_id for w in directory.workers()] == ["decode-0"]
        deadline = time.monotonic() + 5  # no heartbeat: the lease runs out, the worker leaves
        while directory.workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert directory.workers() == []
    finally:
        directory.close()
