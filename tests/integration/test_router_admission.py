"""Admission control under overload: at ten times what the router admits, the excess is refused
at once (429 with Retry-After over HTTP, RESOURCE_EXHAUSTED with retry-after over gRPC), every
admitted request completes, and the router never holds more than its limit. Fake workers."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from baton.v1 import generation_pb2, generation_pb2_grpc
from router.config import RouterConfig
from router.registry import StaticWorkerDirectory
from router.server import Router
from tests.support.fake_workers import FakeBehavior, FakeCluster, reply_script
from tests.support.tiny_tokenizer import byte_level_dir

pytestmark = pytest.mark.integration

MODEL = "tiny-chat"
CAPACITY = 4  # max_inflight_requests
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    from engine.tokenizer import Tokenizer

    model_dir = byte_level_dir(tmp_path_factory.mktemp("model"))
    tokenizer = Tokenizer.from_dir(model_dir)
    reply = tokenizer.encode("Hello world! The capital", add_special_tokens=False)
    # each admitted request streams for ~0.4 s: the slots stay taken while the flood arrives
    cluster = FakeCluster.start(reply_script(reply), tokenizer.eos_token_ids, num_prefill=0,
                                behavior=FakeBehavior(token_delay_s=0.05))
    config = RouterConfig(model_name=MODEL, model_dir=str(model_dir), http_port=0, grpc_port=0,
                          max_inflight_requests=CAPACITY, graceful_shutdown_s=0.5)
    with Router(config, StaticWorkerDirectory(cluster.infos())) as router:
        router.expected_text = tokenizer.decode(reply[:NUM_TOKENS])
        yield router
    cluster.stop()


def test_ten_times_capacity_over_http(router):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": NUM_TOKENS, "ignore_eos": True}
    peak = 0

    async def flood():
        nonlocal peak
        limits = httpx.Limits(max_connections=10 * CAPACITY)
        async with httpx.AsyncClient(base_url=router.http_url, timeout=30, limits=limits) as http:
            await http.get("/health")  # connections up before the clock starts

            async def call():
                nonlocal peak
                reply = await http.post("/v1/completions", json=body)
                peak = max(peak, router.service.num_active)
                return reply

            return await asyncio.gather(*(call() for _ in range(10 * CAPACITY)))

    results = asyncio.run(flood())
    served = [reply for reply in results if reply.status_code == 200]
    refused = [reply for reply in results if reply.status_code == 429]
    assert len(served) + len(refused) == len(results)  # nothing else: no 5xx, no timeout
    assert CAPACITY <= len(served) and refused
    assert all(reply.json()["choices"][0]["text"] == router.expected_text for reply in served)
    for reply in refused:
        assert reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["type"] == "rate_limit_error"
    assert peak <= CAPACITY


def test_overload_over_grpc_says_when_to_retry(router):
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=[5, 6, 7]), max_tokens=NUM_TOKENS, ignore_eos=True)
    with grpc.insecure_channel(router.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        running = [stub.Generate(request, timeout=30) for _ in range(CAPACITY)]
        for call in running:  # each holds a slot once its first token is out
            next(call)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in info.value.trailing_metadata()
        for call in running:
            list(call)  # the admitted ones complete
