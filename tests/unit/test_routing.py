"""router.routing: exact choices from tables of loads, cached prefixes and weights; every term
of the cost (load, KV usage, local prefill, remote prefill and its queue, transfer) is shown to
change a choice on its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from router.registry import WorkerInfo
from router.routing import (
    NoWorkerError,
    PrefillMode,
    RoutingPolicy,
    choose_prefill,
    plan_route,
    worker_load,
)

pytestmark = pytest.mark.unit

N = 1024  # prompt tokens: long enough that a remote prefill is worth it on idle workers
ALWAYS = RoutingPolicy(disaggregation="always")


def plan(workers, inflight=None, n: int = N, **kw):
    return plan_route(workers, inflight or {}, num_prompt_tokens=n, **kw)


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
    assert plan(infos, inflight).decode.worker_id == expected


def test_choice_does_not_depend_on_list_order() -> None:
    infos = [w("d2", running=1), w("d0", running=1), w("d1", running=1)]
    for rotation in range(3):
        rotated = infos[rotation:] + infos[:rotation]
        assert plan(rotated).decode.worker_id == "d0"


def test_only_ready_workers_of_the_role() -> None:
    infos = [w("d0", state="starting"), w("d1", state="draining"), w("d2", running=9),
             w("p0", role="prefill", state="starting")]
    chosen = plan(infos)
    assert chosen.decode.worker_id == "d2"
    assert chosen.prefill is None and chosen.mode is PrefillMode.LOCAL
    assert chosen.reason == "no_prefill"


@pytest.mark.parametrize("prefill, inflight, expected", [
    ([("p0", 2, 0), ("p1", 0, 1)], {}, "p1"),
    ([("p0", 2, 0), ("p1", 0, 1)], {"p1": 2}, "p0"),
    ([("p1", 1, 0), ("p0", 0, 1)], {}, "p0"),
])
def test_least_loaded_prefill(prefill, inflight, expected) -> None:
    infos = [w("d0")] + [w(i, role="prefill", running=r, waiting=q) for i, r, q in prefill]
    chosen = plan(infos, inflight)
    assert chosen.prefill.worker_id == expected
    assert chosen.mode is PrefillMode.REMOTE and chosen.reason == "cost"
    assert choose_prefill(infos, N, inflight).worker_id == expected


def test_colocated_without_prefill_workers_or_when_remote_is_off() -> None:
    assert plan([w("d0")]).mode is PrefillMode.LOCAL
    infos = [w("d0"), w("p0", role="prefill")]
    resumed = plan(infos, allow_remote=False)
    assert resumed.prefill is None and resumed.reason == "resume"


def test_no_ready_decode_worker() -> None:
    with pytest.raises(NoWorkerError, match="no decode worker is ready"):
        plan([w("p0", role="prefill"), w("d0", state="starting")])
    with pytest.raises(NoWorkerError):
        plan([])


def test_exclude_skips_failed_workers() -> None:
    infos = [w("d0"), w("d1", running=3), w("p0", role="prefill"), w("p1", role="prefill", running=1)]
    chosen = plan(infos, exclude=frozenset({"d0", "p0"}))
    assert (chosen.decode.worker_id, chosen.prefill.worker_id) == ("d1", "p1")


def test_worker_load_sums_registry_and_inflight() -> None:
    assert worker_load(w("d0", running=2, waiting=3), {"d0": 4, "d1": 100}) == 9


def test_routing_is_a_pure_core() -> None:
    code = ("import sys, router.routing; "
            "bad = [m for m in ('torch', 'grpc', 'redis', 'ray', 'prometheus_client') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the cost terms, one at a time (weights: RoutingPolicy's defaults) ---------------------------


def test_cached_prefix_outweighs_a_little_load() -> None:
    # d1 holds 1000 of the 1024 tokens: local(d1) = 256*2 + 2*24 = 560 vs d0's 2*1024 = 2048.
    infos = [w("d0"), w("d1", running=2)]
    chosen = plan(infos, cached={"d1": 1000})
    assert chosen.decode.worker_id == "d1" and chosen.cached_tokens == 1000
    # ...but not a lot of it: at 6 requests more, 256*6 + 48 = 1584 < 2048 still; at 8, 2096.
    assert plan([w("d0"), w("d1", running=6)], cached={"d1": 1000}).decode.worker_id == "d1"
    assert plan([w("d0"), w("d1", running=8)], cached={"d1": 1000}).decode.worker_id == "d0"


def test_kv_usage_term() -> None:
    # Equal load; kv_usage 0.9 costs 512*0.9 = 461 tokens: 192 cached tokens save less (2*192 =
    # 384), 304 save more (608).
    infos = [w("d0", kv=0.9), w("d1", kv=0.0)]
    assert plan(infos, cached={"d0": 192}).decode.worker_id == "d1"
    assert plan(infos, cached={"d0": 304}).decode.worker_id == "d0"


def test_short_uncached_suffix_is_prefilled_locally() -> None:
    infos = [w("d0"), w("p0", role="prefill")]
    assert plan(infos, n=128).reason == "short"  # 128 <= local_prefill_max_tokens
    assert plan(infos, n=128).mode is PrefillMode.LOCAL
    # 1024 tokens of which D holds 900: the 124-token suffix is short
    chosen = plan(infos, cached={"d0": 912})
    assert chosen.mode is PrefillMode.LOCAL and chosen.reason == "short"
    assert plan(infos, n=200).mode is PrefillMode.REMOTE
    assert plan(infos, n=200, policy=RoutingPolicy(local_prefill_max_tokens=256)).reason == "short"


def test_busy_prefill_workers_make_local_cheaper() -> None:
    # remote = 1024 + 256*load(P) + 0.25*1024 vs local = 2*1024: local once 256*load(P) > 768
    infos = [w("d0"), w("p0", role="prefill", running=3)]
    assert plan(infos).mode is PrefillMode.REMOTE  # 768 is not more than 768
    infos = [w("d0"), w("p0", role="prefill", running=3, waiting=1)]
    chosen = plan(infos)
    assert chosen.mode is PrefillMode.LOCAL and chosen.reason == "cost"
    always = plan(infos, policy=ALWAYS)
    assert always.mode is PrefillMode.REMOTE and always.reason == "always"


def test_prefill_worker_by_its_own_cached_prefix_against_its_queue() -> None:
    infos = [w("d0"), w("p0", role="prefill"), w("p1", role="prefill", running=1)]
    assert plan(infos).prefill.worker_id == "p0"
    # p1 holds 512 tokens: 512 + 256 < 1024
    assert plan(infos, cached={"p1": 512}).prefill.worker_id == "p1"
    assert plan(infos, cached={"p1": 240}).prefill.worker_id == "p0"  # 784 + 256 > 1024


def test_transfer_cost_counts_what_the_decode_worker_lacks() -> None:
    # Remote for both; d1 already holds 512 tokens, so 512 fewer tokens' KV move: 0.25*512 =
    # 128 tokens cheaper, which beats 100 tokens of KV usage but not 200.
    infos = [w("d0"), w("d1", kv=100 / 512), w("p0", role="prefill")]
    chosen = plan(infos, cached={"d1": 512}, policy=ALWAYS)
    assert chosen.decode.worker_id == "d1"
    infos = [w("d0"), w("d1", kv=200 / 512), w("p0", role="prefill")]
    assert plan(infos, cached={"d1": 512}, policy=ALWAYS).decode.worker_id == "d0"
    free_moves = RoutingPolicy(disaggregation="always", transfer_tokens=0.0)
    infos = [w("d0"), w("d1", kv=100 / 512), w("p0", role="prefill")]
    assert plan(infos, cached={"d1": 512}, policy=free_moves).decode.worker_id == "d0"


def test_local_prefill_factor() -> None:
    infos = [w("d0"), w("p0", role="prefill", running=2)]
    assert plan(infos).mode is PrefillMode.REMOTE  # 1024 + 512 + 256 < 2048
    cheap_local = RoutingPolicy(local_prefill_factor=1.0)
    assert plan(infos, policy=cheap_local).mode is PrefillMode.LOCAL


def test_round_robin_takes_turns_whatever_the_cache() -> None:
    infos = [w("d1"), w("d0"), w("d2", running=9)]
    rr = RoutingPolicy(policy="round_robin")
    chosen = [plan(infos, cached={"d2": 1000}, policy=rr, turn=t).decode.worker_id
              for t in range(4)]
    assert chosen == ["d0", "d1", "d2", "d0"]


@pytest.mark.parametrize("kwargs, message", [
    ({"policy": "random"}, "policy must be one of"),
    ({"disaggregation": "never"}, "disaggregation must be one of"),
    ({"local_prefill_max_tokens": -1}, "local_prefill_max_tokens must be >= 0"),
    ({"transfer_tokens": -0.5}, "transfer_tokens must be >= 0"),
])
def test_policy_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        RoutingPolicy(**kwargs)


def test_prompts_nobody_holds_go_to_the_emptier_cache() -> None:
    infos = [w("d0"), w("d1")]
    assert plan(infos, cache_blocks={"d0": 300, "d1": 120}).decode.worker_id == "d1"
    assert plan(infos, cache_blocks={"d0": 0, "d1": 120}).decode.worker_id == "d0"
    # only a tie-breaker: a cached prefix or lower load wins first
    assert plan(infos, cached={"d0": 512},
                cache_blocks={"d0": 300, "d1": 120}).decode.worker_id == "d0"
    assert plan([w("d0"), w("d1", running=1)],
                cache_blocks={"d0": 300, "d1": 0}).decode.worker_id == "d0"
