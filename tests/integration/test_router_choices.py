"""n > 1 choices in the router against fake workers: choice 0 runs first and the others start
once it has its first token; admission takes every choice's slot or none; a failing choice fails
the request and aborts its siblings; an abort right after the start reaches every choice; client
request ids cannot pose as choice ids; the metrics count a request once. Fixtures are shared with
test_router_fake_workers."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import openai
import pytest

import baton
from router.config import RouterConfig
from router.registry import StaticWorkerDirectory
from router.server import Router
from tests.integration import test_router_fake_workers as shared
from tests.support.fake_workers import FakeBehavior, FakeCluster, reply_script

pytestmark = pytest.mark.integration

MODEL, wait_until = shared.MODEL, shared.wait_until
model_dir, tokenizer, reply_ids, router = (shared.model_dir, shared.tokenizer, shared.reply_ids,
                                           shared.router)
start_cluster, oai, sdk = shared.start_cluster, shared.oai, shared.sdk


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_other_choices_start_after_the_first_token_of_choice_0(start_cluster, sdk,
                                                               num_prefill) -> None:
    cluster = start_cluster(num_prefill=num_prefill,
                            behavior=FakeBehavior(token_delay_s=0.05, prefill_delay_s=0.05))
    result = sdk.generate("Hi", n=3, max_tokens=4, request_id="staged")
    assert [c.finish_reason for c in result.choices] == ["length"] * 3
    first_token_at = {**cluster.decode[0].first_token_at,
                      **(cluster.prefill[0].first_token_at if num_prefill else {})}
    received_at = cluster.decode[0].received_at
    assert set(received_at) == {"staged#0", "staged#1", "staged#2"}
    assert received_at["staged#1"] > first_token_at["staged#0"]
    assert received_at["staged#2"] > first_token_at["staged#0"]


def test_choice_0_failing_before_its_first_token_fails_the_request(start_cluster, oai) -> None:
    behavior = FakeBehavior(generate_error=(grpc.StatusCode.INTERNAL, "injected"),
                            fails=lambda r: r.request_id.endswith("#0"))
    cluster = start_cluster(num_prefill=0, behavior=behavior)
    with pytest.raises(openai.InternalServerError, match="injected"):
        oai.completions.create(model=MODEL, prompt="Hi", n=3, max_tokens=4)
    assert [r.request_id[-2:] for r in cluster.decode[0].requests] == ["#0"]  # no other started


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_a_failing_choice_fails_the_request_and_aborts_its_siblings(start_cluster, oai,
                                                                   num_prefill) -> None:
    behavior = FakeBehavior(token_delay_s=0.05, fail_after_tokens=2,
                            fails=lambda r: r.request_id.endswith("#1"))
    cluster = start_cluster(num_prefill=num_prefill, behavior=behavior)
    with pytest.raises(openai.InternalServerError) as info:
        oai.completions.create(model=MODEL, prompt="Hi", n=3, max_tokens=50)
    assert info.value.status_code == 503 and "injected failure" in info.value.message
    decode = cluster.decode[0]
    rid = decode.requests[0].request_id.rsplit("#", 1)[0]
    wait_until(lambda: {f"{rid}#0", f"{rid}#2"} <= set(decode.aborts))
    assert {f"{rid}#0", f"{rid}#2"} <= set(decode.cancelled)


def test_abort_right_after_the_start_reaches_every_choice(start_cluster, router) -> None:
    cluster = start_cluster(num_prefill=0, behavior=FakeBehavior(token_delay_s=0.05))
    service = router.service

    async def scenario():
        req = service.builder.build("quick", [5, 6, 7], max_tokens=50, n=3)
        outputs = service.generate(req)
        first = asyncio.ensure_future(outputs.__anext__())
        await asyncio.sleep(0)  # generate() admitted the request and scheduled choice 0
        found = service.abort("quick")
        collected = [await first] + [out async for out in outputs]
        return found, collected

    found, outputs = asyncio.run_coroutine_threadsafe(scenario(), router._loop).result(10)
    assert found
    finishes = {out.index: out.finish_reason for out in outputs if out.finish_reason}
    assert finishes == {0: "abort", 1: "abort", 2: "abort"}
    assert outputs[-1].usage is not None and outputs[-1].usage.completion_tokens == 0
    decode = cluster.decode[0]
    wait_until(lambda: {r.request_id for r in decode.requests} <= set(decode.aborts))
    assert service.num_active == 0


def test_client_ids_cannot_pose_as_choice_ids(start_cluster, sdk) -> None:
    cluster = start_cluster(num_prefill=0, behavior=FakeBehavior(token_delay_s=0.05))
    stream = sdk.stream("Hi", n=2, max_tokens=30, request_id="b")
    next(stream)
    for bad in ("b#0", "b~1", "b 0", "x" * 129):
        with pytest.raises(baton.BadRequestError, match="request_id"):
            sdk.generate("Hi", max_tokens=2, request_id=bad)
    assert sdk.abort("b#0") is False  # a choice is not a request of its own
    other = sdk.generate("Hi", max_tokens=2, request_id="b-0")  # the old separator: a client id
    assert other.finish_reason == "length"
    stream.close()
    ids = {r.request_id for r in cluster.decode[0].requests}
    assert {"b#0", "b#1", "b-0"} <= ids


def test_admission_takes_a_slot_per_choice_or_none(model_dir, reply_ids) -> None:
    cluster = FakeCluster.start(reply_script(reply_ids), [0], num_prefill=0)
    directory = StaticWorkerDirectory(cluster.infos())
    config = RouterConfig(model_name=MODEL, model_dir=str(model_dir), http_port=0, grpc_port=0,
                          max_inflight_requests=2, graceful_shutdown_s=0.5)
    try:
        with Router(config, directory) as small:
            body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
            refused = httpx.post(f"{small.http_url}/v1/completions", json={**body, "n": 3},
                                 timeout=30)
            assert refused.status_code == 429, refused.text
            assert cluster.decode[0].requests == []  # refused before any choice started
            served = httpx.post(f"{small.http_url}/v1/completions", json={**body, "n": 2},
                                timeout=30)
            assert served.status_code == 200 and len(served.json()["choices"]) == 2
    finally:
        cluster.stop()


def test_metrics_count_an_n_request_once(start_cluster, sdk, router) -> None:
    start_cluster(num_prefill=1)

    def sample(name: str, **labels) -> float:
        return router.registry.get_sample_value(name, {"model": MODEL, **labels}) or 0.0

    names = [("baton_requests_total", {"finish_reason": "length"}),
             ("baton_prompt_tokens_total", {}), ("baton_generation_tokens_total", {}),
             ("baton_time_to_first_token_seconds_count", {}),
             ("baton_e2e_request_latency_seconds_count", {})]
    before = [sample(name, **labels) for name, labels in names]
    result = sdk.generate(token_ids=[5, 6, 7, 8], n=3, max_tokens=4)
    after = [sample(name, **labels) for name, labels in names]
    assert result.usage == baton.Usage(4, 12, 0)
    assert [b - a for a, b in zip(before, after)] == [1, 4, 12, 1, 1]
