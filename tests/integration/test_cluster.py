"""The launcher on a real local Ray runtime and an embedded Redis, with stand-in components
(tests/support/cluster_fakes.py): actors come up with their resources, register, the router
answers, and stop() leaves no Ray, Redis or worker process behind. A failing worker aborts the
start with its own error and still cleans up."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.config import load_config
from cluster.launcher import Cluster, ClusterStartError, banner
from cluster.redis_server import ping
from tests.support.cluster_fakes import (
    FailingDecodeActor,
    FakeDecodeActor,
    FakePrefillActor,
    FakeRouterActor,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FAKES = {"prefill": FakePrefillActor, "decode": FakeDecodeActor, "router": FakeRouterActor}


@pytest.fixture(autouse=True)
def ray_can_import_tests(monkeypatch):
    """Ray workers import the stand-ins by module name: put the repository on their path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO),
                                                                   os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def config(**overrides):
    return load_config(None, {"router.http_port": 0, "router.grpc_port": 0,
                              "heartbeat_interval_s": 0.5, "lease_ttl_s": 2, **overrides})


def gone(pids: set[int], timeout_s: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left = {p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_cluster_up_and_down():
    import ray

    cluster = Cluster(config(**{"prefill.count": 1, "decode.count": 2}),
                      model_dir="/models/unused", actor_classes=FAKES)
    try:
        endpoints = cluster.start()
        assert sorted(w["role"] for w in endpoints.workers) == ["decode", "decode", "prefill"]
        assert all(w["state"] == "ready" for w in endpoints.workers)
        worker_pids = {w["pid"] for w in endpoints.workers}
        assert len(worker_pids) == 3 and os.getpid() not in worker_pids  # one actor process each
        redis_pid, redis_port = cluster.redis_server.pid, cluster.redis_server.port

        # the router's view, and each worker's metrics endpoint
        listed = httpx.get(f"{endpoints.http_url}/cluster", timeout=5).json()["workers"]
        assert {w["worker_id"] for w in listed} == {w["worker_id"] for w in endpoints.workers}
        for w in endpoints.workers:
            assert httpx.get(w["metrics_url"], timeout=5).status_code == 200

        # heartbeats refresh the load the router sees
        before = {w["worker_id"]: w["num_running"] for w in listed}
        time.sleep(1.5)
        after = httpx.get(f"{endpoints.http_url}/cluster", timeout=5).json()["workers"]
        assert all(w["num_running"] > before[w["worker_id"]] for w in after)

        text = banner(endpoints)
        assert endpoints.http_url in text and "Press Ctrl-C to stop." in text
        for w in endpoints.workers:
            assert w["metrics_url"] in text

        # a worker that dies is noticed (serve logs it) and the rest keep going
        assert cluster.dead_components() == []
        victim = next(w for w in endpoints.workers if w["role"] == "decode")
        psutil.Process(victim["pid"]).kill()
        deadline = time.monotonic() + 20
        while not (dead := cluster.dead_components()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dead == [f"worker {victim['worker_id']}"]
    finally:
        cluster.stop()
    assert not ray.is_initialized()
    assert not ping("127.0.0.1", redis_port)
    assert gone(worker_pids | {redis_pid}) == set()
    cluster.stop()  # twice is harmless


def test_failing_worker_aborts_the_start_and_cleans_up():
    import ray

    cluster = Cluster(config(**{"prefill.count": 0}), model_dir="/models/broken",
                      actor_classes={**FAKES, "decode": FailingDecodeActor})
    with pytest.raises(ClusterStartError) as err:
        cluster.start()
    message = str(err.value)
    assert "decode worker decode-0-" in message and "failed to start" in message
    assert "/models/broken has no config.json" in message
    assert not ray.is_initialized()
    assert cluster.redis_server is None
