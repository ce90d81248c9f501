"""router.registry against a real redis-server: leases expire, heartbeats renew and rebuild,
draining and deregistering, RedisWorkerDirectory polls, follows leases, and keeps its last list
when Redis goes away."""

from __future__ import annotations

import time

import pytest

from router.registry import (
    RedisWorkerDirectory,
    WorkerInfo,
    deregister,
    heartbeat,
    list_workers,
    register_worker,
    worker_key,
)
from tests.support.redis import redis_server  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(redis_server):  # noqa: F811
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def info(worker_id: str, role: str = "decode", **kw) -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, state="ready", grpc_address="127.0.0.1:1",
                      metrics_url="http://127.0.0.1:2/metrics", pid=1, node="n", **kw)


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_register_list_heartbeat_deregister(client) -> None:
    a, b = info("decode-0"), info("prefill-0", role="prefill")
    register_worker(client, a, ttl_s=10)
    register_worker(client, b, ttl_s=10)
    assert [w.worker_id for w in list_workers(client)] == ["decode-0", "prefill-0"]
    assert 0 < client.pttl(worker_key("decode-0")) <= 10_000

    a.num_running, a.kv_usage = 7, 0.5
    assert heartbeat(client, a, ttl_s=10) is True
    (seen,) = [w for w in list_workers(client) if w.worker_id == "decode-0"]
    assert (seen.num_running, seen.kv_usage) == (7, 0.5)

    deregister(client, "prefill-0")
    assert [w.worker_id for w in list_workers(client)] == ["decode-0"]


def test_lease_expires_and_heartbeat_rebuilds(client) -> None:
    a = info("decode-0")
    register_worker(client, a, ttl_s=0.2)
    wait_until(lambda: list_workers(client) == [])
    assert heartbeat(client, a, ttl_s=5) is False  # the lease had expired: written again
    assert [w.worker_id for w in list_workers(client)] == ["decode-0"]


def test_malformed_entries_are_skipped(client) -> None:
    register_worker(client, info("decode-0"))
    client.set(worker_key("junk"), b"not json")
    client.set(worker_key("bad-role"), b'{"worker_id": "x", "role": "chef"}')
    assert [w.worker_id for w in list_workers(client)] == ["decode-0"]


def test_directory_polls_and_survives_redis_loss(redis_server, client) -> None:  # noqa: F811
    directory = RedisWorkerDirectory(redis_server.url, poll_interval_s=0.05, socket_timeout_s=0.3)
    directory.start()
    try:
        assert directory.workers() == [] and directory.healthy
        register_worker(client, info("decode-0"))
        wait_until(lambda: [w.worker_id for w in directory.workers()] == ["decode-0"])
        redis_server.stop()
        wait_until(lambda: not directory.healthy)
        assert [w.worker_id for w in directory.workers()] == ["decode-0"]  # last known list
    finally:
        directory.close()


def test_draining_then_deregister(client) -> None:
    worker = info("decode-0")
    register_worker(client, worker, ttl_s=10)
    worker.state = "draining"
    heartbeat(client, worker, ttl_s=10)
    assert [w.state for w in list_workers(client)] == ["draining"]
    deregister(client, "decode-0")
    assert list_workers(client) == []


def test_directory_drops_a_worker_whose_lease_ran_out(redis_server, client) -> None:  # noqa: F811
    directory = RedisWorkerDirectory(redis_server.url, poll_interval_s=0.05)
    directory.start()
    try:
        register_worker(client, info("decode-0"), ttl_s=0.5)
        wait_until(lambda: [w.worker_id for w in directory.workers()] == ["decode-0"])
        wait_until(lambda: directory.workers() == [])  # no heartbeat: the worker leaves
    finally:
        directory.close()
