"""router.routing: exact choices from tables of loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from router.registry import WorkerInfo
from router.routing import NoWorkerError, PrefillMode, choose_least_loaded, plan_route, worker_load

pytestmark = pytest.mark.unit


def w(worker_id: str, role: str = "decode", running: int = 0, waiting: int = 0,
      kv: float = 0.0, state: str = "ready") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, role=role, state=state, grpc_address=f"{worker_id}:1",
                      metrics_url="", pid=1, node="n", num_running=running, num_waiting=waiting,
                      kv_usage=kv)


@pytest.mark.parametrize("workers, inflight, expected", [
    # (id, running, waiting, kv_usage) -> least running + waiting + in-flight wins
    ([("d0", 3, 0, 0.1), ("d1", 1, 1, 0.1), ("d2", 0, 4, 0.1)], {}, "d1"),
    ([("d0", 3, 0, 0.1), ("d1", 1, 1, 0.1)], {"d1": 2}, "d0"),  # router in-flight counts
    ([("d0", 2, 0, 0.5), ("d1", 1, 1, 0.2)], {}, "d1"),  # tie on load -> lower kv_usage
    ([("d1", 2, 0, 0.2), ("d0", 1, 1, 0.2)], {}, "d0"),  # full tie -> smaller worker_id
    ([("d0", 0, 0, 0.9)], {"d0": 50}, "d0"),  # the only worker, however loaded
    ([("d0", 5, 0, 0.0), ("d1", 0, 0, 0.0)], {"d1": 5}, "d0"),  # 5 vs 5, ids break the tie
    ([("d0", 5, 0, 0.0), ("d1", 0, 0, 0.0)], {"d1": 6}, "d0"),
    ([("d0", 5, 0, 0.0), ("d1", 0, 0, 0.0)], {"d1": 4}, "d1"),
])
def test_least_loaded_decode(workers, inflight, expected) -> None:
    infos = [w(i, running=r, waiting=q, kv=kv) for i, r, q, kv in workers]
    assert choose_least_loaded(infos, "decode", inflight).worker_id == expected
    assert plan_route(infos, inflight).decode.worker_id == expected


def test_choice_does_not_depend_on_list_order() -> None:
    infos = [w("d2", running=1), w("d0", running=1), w("d1", running=1)]
    for rotation in range(3):
        rotated = infos[rotation:] + infos[:rotation]
        assert plan_route(rotated, {}).decode.worker_id == "d0"


def test_only_ready_workers_of_the_role() -> None:
    infos = [w("d0", state="starting"), w("d1", state="draining"), w("d2", running=9),
             w("p0", role="prefill", state="starting")]
    plan = plan_route(infos, {})
    assert plan.decode.worker_id == "d2"
    assert plan.prefill is None and plan.mode is PrefillMode.LOCAL


@pytest.mark.parametrize("prefill, inflight, expected", [
    ([("p0", 2, 0), ("p1", 0, 1)], {}, "p1"),
    ([("p0", 2, 0), ("p1", 0, 1)], {"p1": 2}, "p0"),
    ([("p1", 1, 0), ("p0", 0, 1)], {}, "p0"),
])
def test_least_loaded_prefill(prefill, inflight, expected) -> None:
    infos = [w("d0")] + [w(i, role="prefill", running=r, waiting=q) for i, r, q in prefill]
    plan = plan_route(infos, inflight)
    assert plan.prefill.worker_id == expected
    assert plan.mode is PrefillMode.REMOTE


def test_colocated_without_prefill_workers_or_when_remote_is_off() -> None:
    assert plan_route([w("d0")], {}).mode is PrefillMode.LOCAL
    infos = [w("d0"), w("p0", role="prefill")]
    assert plan_route(infos, {}, allow_remote=False).prefill is None


def test_no_ready_decode_worker() -> None:
    with pytest.raises(NoWorkerError, match="no decode worker is ready"):
        plan_route([w("p0", role="prefill"), w("d0", state="starting")], {})
    with pytest.raises(NoWorkerError):
        plan_route([], {})


def test_exclude_skips_failed_workers() -> None:
    infos = [w("d0"), w("d1", running=3), w("p0", role="prefill"), w("p1", role="prefill", running=1)]
    plan = plan_route(infos, {}, exclude=frozenset({"d0", "p0"}))
    assert (plan.decode.worker_id, plan.prefill.worker_id) == ("d1", "p1")


def test_worker_load_sums_registry_and_inflight() -> None:
    assert worker_load(w("d0", running=2, waiting=3), {"d0": 4, "d1": 100}) == 9


def test_routing_is_a_pure_core() -> None:
    code = ("import sys, router.routing; "
            "bad = [m for m in ('torch', 'grpc', 'redis', 'ray', 'prometheus_client') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
