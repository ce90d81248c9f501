"""The router with real prefill and decode workers (tiny random model, CPU): the OpenAI API streams
what it returns whole, stop strings and client disconnects free the KV blocks on every worker;
logprobs (the first token's included) and seeded sampling with penalties equal what one engine
in this process gives, in both prefill modes and whatever the batch."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import baton
from engine.engine import LLMEngine
from engine.request import SamplingParams
from engine.tokenizer import Tokenizer
from tests.support.models import tiny_model
from tests.support.workers import engine_config, running_cluster

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def all_blocks_free(workers) -> bool:
    return all(w.load().num_free_blocks == w.load().num_total_blocks for w in workers)


@pytest.fixture(scope="module", params=[1, 0], ids=["disaggregated", "colocated"])
def cluster(request):
    with running_cluster(tiny_model("llama-gqa"), num_prefill=request.param) as (router, p, d):
        yield router, [*p, *d]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(tiny_model("llama-gqa"))


def test_streamed_equals_whole_and_usage(cluster, tokenizer) -> None:
    router, workers = cluster
    client = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="x", max_retries=0)
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                           temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    # The second request may hit the prefix cache the first filled: only cached_tokens may differ.
    whole_usage, streamed_usage = whole.usage.model_dump(), chunks[-1].usage.model_dump()
    details = streamed_usage.pop("prompt_tokens_details"), whole_usage.pop("prompt_tokens_details")
    assert streamed_usage == whole_usage
    assert all(d is None or d["cached_tokens"] <= whole.usage.prompt_tokens for d in details)
    assert whole.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert 0 < whole.usage.completion_tokens <= 24
    wait_until(lambda: all_blocks_free(workers))


def test_stop_string_frees_blocks(cluster) -> None:
    router, workers = cluster
    client = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="x", max_retries=0)
    whole = client.completions.create(model="tiny", prompt="The capital", max_tokens=40,
                                      temperature=0, extra_body={"ignore_eos": True})
    text = whole.choices[0].text
    if len(text) < 8:
        pytest.skip(f"the random model's output is too short to cut: {text!r}")
    stop = text[4:7]
    cut = client.completions.create(model="tiny", prompt="The capital", max_tokens=40,
                                    temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.usage.completion_tokens < whole.usage.completion_tokens
    wait_until(lambda: all_blocks_free(workers))


def test_client_disconnect_frees_blocks_within_a_second(cluster) -> None:
    router, workers = cluster
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=router.http_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line)
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert not all_blocks_free(workers)  # the request holds KV while it streams
    # the connection is closed: every worker stops the request and frees its blocks within 1 s
    wait_until(lambda: all_blocks_free(workers), timeout_s=1.0)
    wait_until(lambda: router.service.num_active == 0)
    aborted = router.registry.get_sample_value("baton_requests_total",
                                               {"model": "tiny", "finish_reason": "abort"})
    assert aborted and aborted >= 1  # cut short, not run to max_tokens


# -- sampling: logprobs and seeded penalties, disaggregated and colocated against one engine -------

PROMPT_IDS = [5, 17, 42, 99, 7, 250, 31, 8, 64]
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "presence_penalty": 0.8,
              "frequency_penalty": 0.4, "repetition_penalty": 1.3, "min_p": 0.02}


def engine_run(engine, requests: dict[str, SamplingParams]) -> dict[str, list]:
    """Run requests together on an in-process engine; request id -> [(token_id, logprob)]."""
    for rid, sampling in requests.items():
        engine.add_request(rid, PROMPT_IDS, sampling)
    got: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            logprobs = out.logprobs or [None] * len(out.new_token_ids)
            got[out.request_id] += list(zip(out.new_token_ids, logprobs))
    return got


@pytest.fixture(scope="module")
def reference():
    """What one colocated engine in this process produces, alone: the parity reference."""
    engine = LLMEngine(engine_config(tiny_model("llama-gqa")))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    seeded = SamplingParams(max_tokens=12, ignore_eos=True, **SEEDED)
    return {**engine_run(engine, {"greedy": greedy}), **engine_run(engine, {"seeded": seeded})}


def test_logprobs_match_the_engine_first_token_included(cluster, reference) -> None:
    router, _ = cluster
    with baton.Client(router.grpc_address, timeout=60) as sdk:
        result = sdk.generate(token_ids=PROMPT_IDS, temperature=0, max_tokens=8,
                              ignore_eos=True, logprobs=3)
    expected = reference["greedy"]
    assert list(result.token_ids) == [t for t, _ in expected]
    assert len(result.logprobs) == 8  # the first token's, sampled by P when disaggregated, too
    for got, (token_id, want) in zip(result.logprobs, expected):
        assert got.token_id == token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=1e-5)

    client = openai.OpenAI(base_url=f"{router.http_url}/v1", api_key="x", max_retries=0)
    chat = client.completions.create(model="tiny", prompt=PROMPT_IDS, max_tokens=8,
                                     temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    token_logprobs = chat.choices[0].logprobs.token_logprobs
    assert token_logprobs == pytest.approx([lp.logprob for _, lp in expected], abs=1e-5)


def test_seeded_penalized_sampling_is_the_same_alone_and_in_a_batch(cluster, reference) -> None:
    router, workers = cluster
    expected = [t for t, _ in reference["seeded"]]
    kwargs = dict(token_ids=PROMPT_IDS, max_tokens=12, ignore_eos=True, **SEEDED)
    with baton.Client(router.grpc_address, timeout=60) as sdk:
        alone = sdk.generate(**kwargs)
        others = [{"token_ids": PROMPT_IDS[:5], "max_tokens": 20, "ignore_eos": True, "temperature": 0},
                  {"token_ids": PROMPT_IDS, "max_tokens": 16, "ignore_eos": True, "temperature": 1.0,
                       "seed": 7, "n": 2, "logprobs": 2},
                  kwargs]
        with ThreadPoolExecutor(len(others)) as pool:
            batched = list(pool.map(lambda kw: sdk.generate(**kw), others))[-1]
    assert list(alone.token_ids) == expected
    assert list(batched.token_ids) == expected
    wait_until(lambda: all_blocks_free(workers))


def test_engine_batch_with_penalties_matches_alone(reference) -> None:
    engine = LLMEngine(engine_config(tiny_model("llama-gqa"), max_num_batched_tokens=16))
    batch = {
        "seeded": SamplingParams(max_tokens=12, ignore_eos=True, **SEEDED),
        "greedy": SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3),
        "other": SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True,
                                repetition_penalty=2.0, logprobs=0),
        "plain": SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    }
    got = engine_run(engine, batch)  # chunked prefill (16-token budget) and mixed rows
    assert [t for t, _ in got["seeded"]] == [t for t, _ in reference["seeded"]]
    assert [t for t, _ in got["greedy"]] == [t for t, _ in reference["greedy"]]
    for (_, lp), (_, want) in zip(got["greedy"], reference["greedy"]):
        assert lp.logprob == pytest.approx(want.logprob, abs=1e-5)
    assert all(lp is None for _, lp in got["plain"])
    assert all(lp is not None and lp.top == () for _, lp in got["other"])


# -- the prefix cache across choices and requests ------------------------------------------------


def decode_hits(workers) -> float:
    (decode,) = [w for w in workers if w.role == "decode"]
    return decode.registry.get_sample_value("baton_prefix_cache_hits_total", {
        "model": "tiny", "role": "decode", "worker": decode.worker_id})


def test_n_choices_reuse_the_prompt_of_choice_0(cluster) -> None:
    router, workers = cluster
    prompt = [(7 * i + 3) % 300 + 10 for i in range(40)]  # 2 full blocks of 16, seen by no other
    before = decode_hits(workers)
    with baton.Client(router.grpc_address, timeout=60) as sdk:
        result = sdk.generate(token_ids=prompt, n=3, max_tokens=4, temperature=0,
                              ignore_eos=True)
    assert [c.finish_reason for c in result.choices] == ["length"] * 3
    # Choices 1 and 2 started after choice 0's first token, when its blocks were cached.
    assert decode_hits(workers) - before >= 2 * (len(prompt) // 16) * 16
    wait_until(lambda: all_blocks_free(workers))


def test_the_same_prompt_twice_reports_cached_tokens(cluster) -> None:
    router, _workers = cluster
    prompt = [(11 * i + 5) % 300 + 20 for i in range(37)]  # 2 full blocks, seen by no other
    with baton.Client(router.grpc_address, timeout=60) as sdk:
        first = sdk.generate(token_ids=prompt, max_tokens=3, temperature=0, ignore_eos=True)
        second = sdk.generate(token_ids=prompt, max_tokens=3, temperature=0, ignore_eos=True)
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == (len(prompt) // 16) * 16
    assert second.token_ids == first.token_ids
