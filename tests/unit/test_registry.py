"""router.registry without Redis: WorkerInfo, the JSON form, StaticWorkerDirectory, and a
RedisWorkerDirectory whose Redis is unreachable (it must keep serving the last list)."""

from __future__ import annotations

import json
import socket

import pytest

from router.registry import (
    KEY_PREFIX,
    RedisWorkerDirectory,
    StaticWorkerDirectory,
    WorkerInfo,
    worker_key,
)

pytestmark = pytest.mark.unit


def info(worker_id: str = "decode-0", **kw) -> WorkerInfo:
    fields = {"worker_id": worker_id, "role": "decode", "state": "ready", "grpc_address": "h:1",
              "metrics_url": "http://h:2/metrics", "pid": 42, "node": "node-a"}
    fields.update(kw)
    return WorkerInfo(**fields)


def test_json_roundtrip_and_key_schema() -> None:
    original = info(num_running=3, num_waiting=1, kv_usage=0.25)
    assert WorkerInfo.from_json(original.to_json()) == original
    assert worker_key("decode-0") == KEY_PREFIX + "decode-0" == "baton:workers:decode-0"


def test_from_json_ignores_unknown_fields_from_newer_writers() -> None:
    raw = json.loads(info().to_json())
    raw["gpu"] = "H100"
    assert WorkerInfo.from_json(json.dumps(raw)).worker_id == "decode-0"


@pytest.mark.parametrize("field, value, message", [
    ("role", "router", "role must be one of prefill, decode"),
    ("state", "dead", "state must be one of starting, ready, draining"),
    ("worker_id", "", "worker_id must not be empty"),
])
def test_worker_info_validates(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        info(**{field: value})


def test_static_directory() -> None:
    directory = StaticWorkerDirectory([info("a")])
    directory.start()
    assert [w.worker_id for w in directory.workers()] == ["a"]
    directory.set([info("b"), info("c")])
    assert [w.worker_id for w in directory.workers()] == ["b", "c"]
    directory.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_directory_survives_unreachable_redis() -> None:
    directory = RedisWorkerDirectory(f"redis://127.0.0.1:{_closed_port()}/0",
                                     poll_interval_s=0.05, socket_timeout_s=0.2)
    directory.start()  # does not raise: the router must come up without Redis
    try:
        assert directory.workers() == []
        assert not directory.healthy
        assert directory.poll() is False
    finally:
        directory.close()
