"""The router with real prefill and decode workers (tiny random model, CPU): the OpenAI API streams
what it returns whole, stop strings and client disconnects free the KV blocks on every worker."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from engine.tokenizer import Tokenizer
from tests.support.models import tiny_model
from tests.support.workers import running_cluster

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
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
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


def test_client_disconnect_frees_blocks(cluster) -> None:
    router, workers = cluster
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=router.http_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line)
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    wait_until(lambda: router.service.num_active == 0)
    aborted = router.registry.get_sample_value("baton_requests_total",
                                               {"model": "tiny", "finish_reason": "abort"})
    assert aborted and aborted >= 1  # cut short, not run to max_tokens
    wait_until(lambda: all_blocks_free(workers))
