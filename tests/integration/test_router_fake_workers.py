"""The router end to end against fake workers (real gRPC servers on loopback, scripted tokens):
the official `openai` client over HTTP, the Baton SDK over gRPC, health and reflection, both
prefill modes, stop strings, aborts, client disconnects, worker failures and deadlines."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

import baton
from baton.v1 import generation_pb2, generation_pb2_grpc, worker_pb2
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.registry import StaticWorkerDirectory
from router.routing import RoutingPolicy
from router.server import Router
from tests.support.fake_workers import FakeBehavior, FakeCluster, reply_script
from tests.support.tiny_tokenizer import MAX_MODEL_LEN, byte_level_dir

pytestmark = pytest.mark.integration

MODEL = "tiny-chat"
REPLY = "Hello world! The capital of France is Paris. 中文字符 🙂 café."
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return byte_level_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def reply_ids(tokenizer) -> list[int]:
    return tokenizer.encode(REPLY, add_special_tokens=False) + [tokenizer.eos_token_id]


@pytest.fixture(scope="module")
def router(model_dir):
    directory = StaticWorkerDirectory([])
    # disaggregation "always": these short prompts still take the prefill workers' path
    config = RouterConfig(model_name=MODEL, model_dir=str(model_dir), http_port=0, grpc_port=0,
                          request_timeout_s=20, prefill_timeout_s=5, worker_rpc_timeout_s=2,
                          graceful_shutdown_s=1, routing=RoutingPolicy(disaggregation="always"))
    router = Router(config, directory)
    router.start()
    yield router
    router.stop()


@pytest.fixture()
def start_cluster(router, reply_ids, tokenizer):
    """start_cluster(num_decode=1, num_prefill=1, behavior=None) -> FakeCluster, wired in."""
    clusters = []

    def start(num_decode: int = 1, num_prefill: int = 1, behavior: FakeBehavior | None = None,
              script=None) -> FakeCluster:
        cluster = FakeCluster.start(script or reply_script(reply_ids), tokenizer.eos_token_ids,
                                    num_decode=num_decode, num_prefill=num_prefill,
                                    behavior=behavior)
        clusters.append(cluster)
        router.directory.set(cluster.infos())
        return cluster

    yield start
    router.directory.set([])
    for cluster in clusters:
        cluster.stop()


@pytest.fixture()
def oai(router) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="x", max_retries=0,
                           timeout=30)
    yield client
    client.close()


@pytest.fixture()
def sdk(router):
    with baton.Client(router.grpc_address, timeout=30) as client:
        yield client


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# -- OpenAI API, both prefill modes ---------------------------------------------------------------


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_chat_streamed_and_not(start_cluster, oai, tokenizer, reply_ids, num_prefill) -> None:
    cluster = start_cluster(num_prefill=num_prefill)
    full = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert full.object == "chat.completion" and full.model == MODEL
    assert full.id.startswith("chatcmpl-")
    (choice,) = full.choices
    assert choice.message.role == "assistant" and choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    prompt_ids = tokenizer.encode_chat(MESSAGES)
    assert full.usage.prompt_tokens == len(prompt_ids)
    assert full.usage.completion_tokens == len(reply_ids)
    assert full.usage.total_tokens == len(prompt_ids) + len(reply_ids)

    chunks = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reply_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5  # streamed

    # the workers saw the chat-templated prompt, in the mode the cluster implies
    requests = cluster.decode[0].requests
    assert [list(r.prompt_token_ids) for r in requests] == [prompt_ids, prompt_ids]
    mode = worker_pb2.PREFILL_MODE_REMOTE if num_prefill else worker_pb2.PREFILL_MODE_LOCAL
    assert {r.prefill_mode for r in requests} == {mode}
    if num_prefill:
        prefills = cluster.prefill[0].requests
        assert len(prefills) == 2
        assert prefills[0].decode_address == cluster.decode[0].address
        assert prefills[0].transfer_id == requests[0].transfer_id != requests[1].transfer_id
        assert prefills[0].num_skip_tokens == 0


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_completions_streamed_and_not(start_cluster, oai, reply_ids, num_prefill) -> None:
    start_cluster(num_prefill=num_prefill)
    full = oai.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert full.object == "text_completion"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 5 and full.usage.prompt_tokens == 1
    stream = list(oai.completions.create(model=MODEL, prompt="Hello", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text
    assert stream[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in stream)  # include_usage not asked for

    # token-id prompts and the default max_tokens (16)
    by_ids = oai.completions.create(model=MODEL, prompt=[5, 6, 7])
    assert by_ids.usage.prompt_tokens == 3
    assert by_ids.usage.completion_tokens == min(16, len(reply_ids))


def test_max_tokens_capped_to_the_context(start_cluster, oai, tokenizer) -> None:
    cluster = start_cluster(num_prefill=0)
    prompt = [5] * (MAX_MODEL_LEN - 3)
    out = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=100)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert cluster.decode[0].requests[-1].sampling.max_tokens == 3


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_stop_string_finishes_and_aborts_on_the_worker(start_cluster, oai, num_prefill) -> None:
    cluster = start_cluster(num_prefill=num_prefill, behavior=FakeBehavior(token_delay_s=0.01))
    out = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=50, stop=["Paris", "zzz"])
    assert out.choices[0].text == "Hello world! The capital of France is "
    assert out.choices[0].finish_reason == "stop"
    stream = list(oai.completions.create(model=MODEL, prompt="Hi", max_tokens=50, stop="France",
                                         stream=True))
    assert "".join(c.choices[0].text for c in stream) == "Hello world! The capital of "
    assert stream[-1].choices[0].finish_reason == "stop"
    decode = cluster.decode[0]
    wait_until(lambda: len(decode.aborts) == 2)  # both requests were cut short on D
    assert decode.aborts == [out.id, stream[0].id]


def test_usage_counts_tokens_not_text_on_stop(start_cluster, oai, tokenizer) -> None:
    start_cluster(num_prefill=1)
    out = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=50, stop="world")
    assert out.choices[0].text == "Hello "
    assert out.usage.completion_tokens == len(tokenizer.encode("Hello world", add_special_tokens=False))


def test_concurrent_requests_spread_over_decode_workers(start_cluster, oai, tokenizer,
                                                        reply_ids) -> None:
    cluster = start_cluster(num_decode=2, num_prefill=2, behavior=FakeBehavior(token_delay_s=0.01))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda i: oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8),
            range(8)))
    assert {r.choices[0].message.content for r in results} == {tokenizer.decode(reply_ids[:8])}
    assert all(len(w.requests) > 0 for w in (*cluster.decode, *cluster.prefill))


def test_bad_inputs_interleaved_with_good_requests(start_cluster, oai, router) -> None:
    start_cluster(num_prefill=1)
    from tests.unit.test_http_validation import BAD_REQUESTS

    bad = [(p, {**b, "model": MODEL} if b.get("model") == "tiny" else b, param)
           for p, b, param, _ in BAD_REQUESTS]
    with httpx.Client(base_url=router.http_url, timeout=30) as http:
        for path, body, param in bad:
            response = http.post(path, json=body)
            assert response.status_code == 400, (path, body, response.text)
            assert response.json()["error"]["param"] == param
            good = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
            assert good.choices[0].text == "Hello world!"
        response = http.post("/v1/chat/completions", content=b"{nope",
                             headers={"content-type": "application/json"})
        assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.status_code == 400 and info.value.code == "model_not_found"


def test_http_client_disconnect_aborts_on_workers(start_cluster, router) -> None:
    cluster = start_cluster(num_prefill=1, behavior=FakeBehavior(token_delay_s=0.2))
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 50, "stream": True}
    with httpx.Client(base_url=router.http_url, timeout=30) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
        rid = json.loads(first[6:])["id"]
    decode = cluster.decode[0]
    wait_until(lambda: rid in decode.aborts and rid in decode.cancelled)
    wait_until(lambda: router.service.num_active == 0)


def test_non_streamed_client_disconnect_aborts(start_cluster, router) -> None:
    cluster = start_cluster(num_prefill=0, behavior=FakeBehavior(token_delay_s=0.2))
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 50}
    with httpx.Client(base_url=router.http_url, timeout=0.6) as http, \
            pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body)
    decode = cluster.decode[0]
    wait_until(lambda: len(decode.aborts) == 1 and len(decode.cancelled) == 1)


# -- failures -------------------------------------------------------------------------------------


def test_prefill_failure_falls_back_to_local_prefill(start_cluster, oai) -> None:
    behavior = FakeBehavior(prefill_error=(grpc.StatusCode.UNAVAILABLE, "prefill worker is gone"))
    cluster = start_cluster(num_prefill=1, behavior=behavior)
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert out.choices[0].message.content == REPLY
    modes = [r.prefill_mode for r in cluster.decode[0].requests]
    assert modes == [worker_pb2.PREFILL_MODE_REMOTE, worker_pb2.PREFILL_MODE_LOCAL]
    wait_until(lambda: out.id in cluster.decode[0].aborts)  # the REMOTE reservation was freed


def test_prefill_failure_retries_on_another_prefill_worker(start_cluster, oai, router) -> None:
    cluster = start_cluster(num_prefill=2)
    cluster.prefill[0].behavior = FakeBehavior(
        prefill_error=(grpc.StatusCode.UNAVAILABLE, "prefill worker is gone"))
    cluster.prefill[1].behavior = FakeBehavior()
    retries = router.metrics.request_retries._value.get()
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert out.choices[0].message.content == REPLY
    assert len(cluster.prefill[0].requests) == 1 and len(cluster.prefill[1].requests) == 1
    modes = [r.prefill_mode for r in cluster.decode[0].requests]
    assert modes == [worker_pb2.PREFILL_MODE_REMOTE, worker_pb2.PREFILL_MODE_REMOTE]
    assert router.metrics.request_retries._value.get() == retries + 1
    assert router.service.dispatcher.inflight == {}  # the second prefill worker was let go


def test_two_failed_prefill_workers_fall_back_to_local_prefill(start_cluster, oai) -> None:
    behavior = FakeBehavior(prefill_error=(grpc.StatusCode.UNAVAILABLE, "prefill worker is gone"))
    cluster = start_cluster(num_prefill=3, behavior=behavior)
    out = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert out.choices[0].message.content == REPLY
    modes = [r.prefill_mode for r in cluster.decode[0].requests]
    assert modes == [worker_pb2.PREFILL_MODE_REMOTE] * 2 + [worker_pb2.PREFILL_MODE_LOCAL]
    assert sum(len(p.requests) for p in cluster.prefill) == 2  # MAX_PREFILL_ATTEMPTS


def test_unavailable_decode_worker_is_skipped(start_cluster, oai, reply_ids, tokenizer) -> None:
    cluster = start_cluster(num_decode=2, num_prefill=0)
    cluster.decode[0].behavior.generate_error = (grpc.StatusCode.UNAVAILABLE, "draining")
    cluster.decode[1].behavior = FakeBehavior()
    out = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert out.choices[0].text == "Hello world! The"
    assert len(cluster.decode[0].requests) == 1 and len(cluster.decode[1].requests) == 1


@pytest.mark.parametrize("code, status, error_class", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, openai.RateLimitError),
    (grpc.StatusCode.INVALID_ARGUMENT, 400, openai.BadRequestError),
    (grpc.StatusCode.UNAVAILABLE, 503, openai.InternalServerError),
])
def test_worker_errors_map_to_http_status(start_cluster, oai, code, status, error_class) -> None:
    start_cluster(num_prefill=0, behavior=FakeBehavior(generate_error=(code, "injected")))
    with pytest.raises(error_class) as info:
        oai.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert info.value.status_code == status
    assert "injected" in info.value.message


def test_failure_after_first_token_reaches_the_stream(start_cluster, router) -> None:
    start_cluster(num_prefill=0, behavior=FakeBehavior(fail_after_tokens=3))
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 50, "stream": True}
    with httpx.Client(base_url=router.http_url, timeout=30) as http:
        lines = [line for line in http.post("/v1/completions", json=body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "service_unavailable_error"


@pytest.mark.parametrize("num_prefill", [0, 1])
def test_decode_failure_mid_stream_migrates_without_losing_a_token(
        start_cluster, router, tokenizer, reply_ids, num_prefill) -> None:
    cluster = start_cluster(num_decode=2, num_prefill=num_prefill)
    cluster.decode[0].behavior = FakeBehavior(fail_after_tokens=3)  # picked first: smaller id
    cluster.decode[1].behavior = FakeBehavior()
    migrations = router.metrics.request_migrations._value.get()
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "stream": True}
    with httpx.Client(base_url=router.http_url, timeout=30) as http:
        lines = [line for line in http.post("/v1/completions", json=body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(c["text"] for line in lines[:-1] for c in json.loads(line[6:])["choices"])
    assert text == tokenizer.decode(reply_ids[:8])  # every token once, in order
    (resumed,) = cluster.decode[1].requests
    assert resumed.prefill_mode == worker_pb2.PREFILL_MODE_LOCAL
    # P's first token (when there is a P) and D0's three before it failed
    assert list(resumed.output_token_ids) == reply_ids[:3 + num_prefill]
    assert router.metrics.request_migrations._value.get() == migrations + 1


def test_a_first_token_that_ends_the_request_needs_nothing_more_from_the_decode_worker(
        start_cluster, oai, tokenizer, reply_ids) -> None:
    """max_tokens 1 through a prefill worker: the request ends with P's answer, even if the
    decode worker fails before it would have sent its (empty) last batch."""
    cluster = start_cluster(num_decode=1, num_prefill=1)
    cluster.decode[0].behavior = FakeBehavior(fail_after_tokens=0)
    out = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert out.choices[0].text == tokenizer.decode(reply_ids[:1])
    assert out.choices[0].finish_reason == "length"


def test_request_deadline(model_dir, reply_ids) -> None:
    directory = StaticWorkerDirectory([])
    config = RouterConfig(model_name=MODEL, model_dir=str(model_dir), http_port=0, grpc_port=0,
                          request_timeout_s=0.8, graceful_shutdown_s=0.5)
    cluster = FakeCluster.start(reply_script(reply_ids), [0], num_prefill=0,
                                behavior=FakeBehavior(token_delay_s=0.5))
    directory.set(cluster.infos())
    with Router(config, directory) as short:  # a router of its own, with a short deadline
        response = httpx.post(f"{short.http_url}/v1/completions", timeout=30,
                              json={"model": MODEL, "prompt": "Hi", "max_tokens": 50})
        assert response.status_code == 504, response.text
        with baton.Client(short.grpc_address) as client, \
                pytest.raises(baton.DeadlineExceededError):
            client.generate("Hi", max_tokens=50)
    cluster.stop()


# -- gRPC: SDK, health, reflection ----------------------------------------------------------------


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_sdk_streams_tokens(start_cluster, sdk, tokenizer, reply_ids, num_prefill) -> None:
    start_cluster(num_prefill=num_prefill)
    chunks = list(sdk.stream(messages=MESSAGES))
    assert len(chunks) > 5
    assert "".join(c.text for c in chunks) == REPLY
    assert [t for c in chunks for t in c.token_ids] == reply_ids
    assert chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage == baton.Usage(len(tokenizer.encode_chat(MESSAGES)), len(reply_ids), 0)

    result = sdk.generate("Hello", max_tokens=4, temperature=0.0, seed=7)
    assert (result.text, result.finish_reason) == ("Hello world! The", "length")
    assert result.usage.completion_tokens == 4 and len(result.token_ids) == 4
    by_ids = sdk.generate(token_ids=[1, 2, 3], max_tokens=2, stop=["world"])
    assert by_ids.text == "Hello " and by_ids.finish_reason == "stop"
    assert sdk.list_models() == [baton.ModelInfo(MODEL, MAX_MODEL_LEN)]


def test_sdk_async_client(start_cluster, router) -> None:
    start_cluster(num_prefill=1)

    async def main():
        async with baton.AsyncClient(router.grpc_address) as client:
            pieces = [c.text async for c in client.stream("Hi", max_tokens=3)]
            result = await client.generate(messages=MESSAGES, max_tokens=2)
            models = await client.list_models()
            return pieces, result, models

    pieces, result, models = asyncio.run(main())
    assert "".join(pieces) == "Hello world!"
    assert result.text == "Hello world" and result.finish_reason == "length"
    assert models[0].id == MODEL


@pytest.mark.parametrize("kwargs, param", [
    ({"prompt": "Hi", "temperature": -1.0}, "temperature"),
    ({"prompt": "Hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"messages": []}, "messages"),
    ({"token_ids": [10**7]}, "token_ids"),
    ({"token_ids": [1] * MAX_MODEL_LEN}, "token_ids"),
])
def test_sdk_bad_input_is_invalid_argument(start_cluster, sdk, kwargs, param) -> None:
    start_cluster(num_prefill=0)
    with pytest.raises(baton.BadRequestError) as info:
        sdk.generate(**kwargs)
    assert info.value.code == "INVALID_ARGUMENT" and param in info.value.message


def test_sdk_unknown_model(start_cluster, router) -> None:
    start_cluster(num_prefill=0)
    with baton.Client(router.grpc_address, model="other") as client, \
            pytest.raises(baton.BadRequestError, match="does not exist"):
        client.generate("Hi")


def test_sdk_abort_and_early_close(start_cluster, sdk) -> None:
    cluster = start_cluster(num_prefill=1, behavior=FakeBehavior(token_delay_s=0.1))
    timer = threading.Timer(0.35, lambda: sdk.abort("to-abort"))
    timer.start()
    result = sdk.generate("Hi", max_tokens=50, request_id="to-abort")
    timer.join()
    assert result.finish_reason == "abort" and result.usage.completion_tokens < 15
    assert sdk.abort("no-such-request") is False

    stream = sdk.stream("Hi", max_tokens=50, request_id="closed-early")
    next(stream)
    stream.close()  # cancels the RPC: the router aborts the request on the workers
    decode = cluster.decode[0]
    wait_until(lambda: {"to-abort", "closed-early"} <= set(decode.aborts))


def test_sdk_retries_unavailable_before_first_token() -> None:
    from concurrent import futures

    calls = []

    class Flaky(generation_pb2_grpc.GenerationServicer):
        def Generate(self, request, context):
            calls.append(request.request_id)
            if len(calls) < 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
            yield generation_pb2.GenerateResponse(
                request_id=request.request_id, text="ok", token_ids=[1], finish_reason=1,
                usage=generation_pb2.Usage(prompt_tokens=1, completion_tokens=1))

    server = grpc.server(futures.ThreadPoolExecutor(4))
    generation_pb2_grpc.add_GenerationServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with baton.Client(f"127.0.0.1:{port}", retry_backoff_s=0.01) as client:
            result = client.generate("Hi", request_id="r1")
            assert result.text == "ok" and calls == ["r1"] * 3
        with baton.Client(f"127.0.0.1:{port}", max_retries=0) as client:
            calls.clear()
            with pytest.raises(baton.UnavailableError):
                client.generate("Hi")
    finally:
        server.stop(0)


def test_grpc_health_and_reflection(router) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(router.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "baton.v1.Generation"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "baton.v1.Generation" in names and "grpc.health.v1.Health" in names


# -- operational endpoints ------------------------------------------------------------------------


def test_cluster_targets_health_and_metrics(start_cluster, oai, router) -> None:
    cluster = start_cluster(num_decode=1, num_prefill=1)
    oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    with httpx.Client(base_url=router.http_url, timeout=10) as http:
        health = http.get("/health").json()
        assert health == {"status": "ok", "ready_decode_workers": 1, "ready_prefill_workers": 1,
                          "mode": "disaggregated"}
        workers = http.get("/cluster").json()["workers"]
        assert {w["id"] for w in workers} == {"decode-0", "prefill-0"}
        d = next(w for w in workers if w["id"] == "decode-0")
        assert d["grpc_address"] == cluster.decode[0].address and d["role"] == "decode"
        assert {"state", "metrics_url", "pid", "running", "waiting", "kv_usage"} <= set(d)
        targets = http.get("/prometheus/targets").json()
        assert [g["labels"]["role"] for g in targets] == ["router", "decode", "prefill"]
        assert targets[0]["targets"] == [f"127.0.0.1:{router.http_port}"]
        metrics = http.get("/metrics").text
    assert f'baton_requests_total{{finish_reason="length",model="{MODEL}"}}' in metrics
    assert "baton_time_to_first_token_seconds_count" in metrics


def test_abort_while_prefilling_reaches_both_workers(start_cluster, sdk) -> None:
    cluster = start_cluster(num_prefill=1, behavior=FakeBehavior(prefill_delay_s=0.6))
    timer = threading.Timer(0.25, lambda: sdk.abort("abort-in-prefill"))
    timer.start()
    result = sdk.generate("Hi", max_tokens=50, request_id="abort-in-prefill")
    timer.join()
    assert result.finish_reason == "abort" and result.usage.completion_tokens == 0
    wait_until(lambda: "abort-in-prefill" in cluster.decode[0].aborts
               and "abort-in-prefill" in cluster.prefill[0].aborts)


def test_duplicate_request_id_is_refused(start_cluster, sdk) -> None:
    start_cluster(num_prefill=0, behavior=FakeBehavior(token_delay_s=0.1))
    stream = sdk.stream("Hi", max_tokens=20, request_id="dup")
    next(stream)
    with pytest.raises(baton.BadRequestError, match="already in use"):
        sdk.generate("Hi", request_id="dup")
    stream.close()
