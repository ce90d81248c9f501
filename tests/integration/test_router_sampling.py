"""The router's sampling surface against fake workers: n choices (fan-out, seed + i, indices,
usage), logprobs in OpenAI's chat and completions shapes (streamed and not, first token included
in both prefill modes), vLLM's sampling extensions reaching the workers, and the same over the
SDK; usage's cached tokens in both prefill modes, and completions text offsets under a
SentencePiece tokenizer. Fixtures (router, fake cluster, clients) are shared with
test_router_fake_workers."""

from __future__ import annotations

import threading

import grpc
import openai
import pytest

import baton
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.registry import StaticWorkerDirectory
from router.server import Router
from tests.integration import test_router_fake_workers as shared
from tests.support.fake_workers import FakeBehavior, FakeCluster, fake_logprob, reply_script
from tests.support.tiny_tokenizer import sentencepiece_dir

pytestmark = pytest.mark.integration

MESSAGES, MODEL, wait_until = shared.MESSAGES, shared.MODEL, shared.wait_until
# The router and fake-cluster fixtures of test_router_fake_workers, shared.
model_dir, tokenizer, reply_ids, router = (shared.model_dir, shared.tokenizer, shared.reply_ids,
                                           shared.router)
start_cluster, oai, sdk = shared.start_cluster, shared.oai, shared.sdk


def seed_script(tokenizer):
    """Replies "choice <seed>." then EOS: each choice's text says which seed it sampled with."""
    def script(prompt, sampling):
        text = f"choice {sampling.seed}."
        return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return script


def ascii_script(tokenizer, text="Hello world, the capital is Paris."):
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return lambda prompt, sampling: list(ids)


# -- n choices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_chat_n_choices_fan_out_with_seed_plus_index(start_cluster, oai, tokenizer,
                                                      num_prefill) -> None:
    cluster = start_cluster(num_prefill=num_prefill, script=seed_script(tokenizer))
    full = oai.chat.completions.create(model=MODEL, messages=MESSAGES, n=3, seed=7)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert [c.message.content for c in full.choices] == ["choice 7.", "choice 8.", "choice 9."]
    assert {c.finish_reason for c in full.choices} == {"stop"}
    num_prompt = len(tokenizer.encode_chat(MESSAGES))
    per_choice = len(tokenizer.encode("choice 7.", add_special_tokens=False)) + 1
    assert full.usage.prompt_tokens == num_prompt  # counted once
    assert full.usage.completion_tokens == 3 * per_choice
    requests = cluster.decode[0].requests
    assert sorted(r.request_id for r in requests) == [f"{full.id}#{i}" for i in range(3)]
    assert sorted(r.sampling.seed for r in requests) == [7, 8, 9]

    chunks = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, seed=100,
                                              stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    roles, finishes = set(), {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        roles.update([choice.index] if choice.delta.role == "assistant" else [])
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "choice 100.", 1: "choice 101."}
    assert roles == {0, 1} and finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == num_prompt
    assert chunks[-1].usage.completion_tokens == sum(
        len(tokenizer.encode(text, add_special_tokens=False)) + 1 for text in texts.values())


def test_completions_n_without_seed_and_usage_on_length(start_cluster, oai, reply_ids) -> None:
    cluster = start_cluster(num_prefill=0)
    out = oai.completions.create(model=MODEL, prompt="Hello", n=4, max_tokens=3)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert len({c.text for c in out.choices}) == 1  # the fake replies alike
    assert {c.finish_reason for c in out.choices} == {"length"}
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 1
    assert {r.sampling.HasField("seed") for r in cluster.decode[0].requests} == {False}


def test_abort_of_an_n_request_reaches_every_choice(start_cluster, sdk) -> None:
    cluster = start_cluster(num_prefill=0, behavior=FakeBehavior(token_delay_s=0.1))
    timer = threading.Timer(0.35, lambda: sdk.abort("many"))
    timer.start()
    result = sdk.generate("Hi", max_tokens=50, request_id="many", n=3)
    timer.join()
    assert [c.finish_reason for c in result.choices] == ["abort"] * 3
    wait_until(lambda: {"many#0", "many#1", "many#2"} <= set(cluster.decode[0].aborts))


# -- logprobs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_chat_logprobs_shape_streamed_and_not(start_cluster, oai, tokenizer,
                                              num_prefill) -> None:
    script = ascii_script(tokenizer)
    cluster = start_cluster(num_prefill=num_prefill, script=script)
    ids = script(None, None)
    full = oai.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True,
                                       top_logprobs=2)
    (choice,) = full.choices
    content = choice.logprobs.content
    assert len(content) == len(ids) == full.usage.completion_tokens
    for i, (entry, token_id) in enumerate(zip(content, ids)):
        expected = fake_logprob(i, token_id, 2)  # position 0: sampled by P when disaggregated
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        assert (entry.token, entry.logprob, entry.bytes) == (
            text, expected.logprob, list(text.encode()))
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [
            (tokenizer.decode([t], skip_special_tokens=False), v) for t, v in expected.top]
    assert cluster.decode[0].requests[-1].sampling.logprobs == 2

    chunks = list(oai.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True,
                                              stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert all(e.top_logprobs == [] for e in streamed)  # top_logprobs defaults to 0

    plain = oai.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert plain.choices[0].logprobs is None
    assert not cluster.decode[0].requests[-1].sampling.HasField("logprobs")


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
def test_completions_logprobs_shape_with_n(start_cluster, oai, tokenizer, stream) -> None:
    script = ascii_script(tokenizer)
    start_cluster(num_prefill=1, script=script)
    ids = script(None, None)[:6]
    response = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=6, logprobs=3, n=2,
                                      stream=stream)
    per_choice: dict[int, dict] = {}
    for part in (response if stream else [response]):
        for choice in part.choices:
            got = per_choice.setdefault(choice.index, {"text": "", "tokens": [], "lps": [],
                                                       "tops": [], "offsets": []})
            got["text"] += choice.text
            if choice.logprobs is not None:
                got["tokens"] += choice.logprobs.tokens
                got["lps"] += choice.logprobs.token_logprobs
                got["tops"] += choice.logprobs.top_logprobs
                got["offsets"] += choice.logprobs.text_offset
    assert sorted(per_choice) == [0, 1]
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    for got in per_choice.values():
        assert got["tokens"] == texts and "".join(texts) == got["text"]
        assert got["lps"] == [fake_logprob(i, t, 3).logprob for i, t in enumerate(ids)]
        assert got["tops"] == [
            {tokenizer.decode([t], skip_special_tokens=False): v
             for t, v in fake_logprob(i, token, 3).top} for i, token in enumerate(ids)]
        assert got["offsets"] == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]


# -- extensions reach the workers -----------------------------------------------------------------


def test_sampling_extensions_reach_the_workers(start_cluster, oai, tokenizer) -> None:
    cluster = start_cluster(num_prefill=1)
    oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, presence_penalty=0.5,
        frequency_penalty=-1.5, seed=3,
        extra_body={"top_k": 7, "min_p": 0.25, "repetition_penalty": 1.25,
                    "stop_token_ids": [5, 9], "ignore_eos": True})
    for worker in (cluster.decode[0], cluster.prefill[0]):
        sampling = worker.requests[-1].sampling
        assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.5)
        assert (sampling.top_k, sampling.min_p, sampling.repetition_penalty) == (7, 0.25, 1.25)
        assert list(sampling.stop_token_ids) == [5, 9] and sampling.ignore_eos
        assert sampling.seed == 3
    oai.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    sampling = cluster.decode[0].requests[-1].sampling
    assert not sampling.HasField("repetition_penalty") and sampling.min_p == 0.0


# -- SDK ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_prefill", [0, 1], ids=["colocated", "disaggregated"])
def test_sdk_n_and_logprobs(start_cluster, sdk, tokenizer, num_prefill) -> None:
    cluster = start_cluster(num_prefill=num_prefill, script=seed_script(tokenizer))
    result = sdk.generate("Hi", n=2, seed=41, logprobs=1, presence_penalty=0.5,
                          frequency_penalty=0.25, repetition_penalty=1.1, min_p=0.05,
                          stop_token_ids=[3])
    assert [c.text for c in result.choices] == ["choice 41.", "choice 42."]
    assert result.text == "choice 41." and result.finish_reason == "stop"
    for choice in result.choices:
        assert len(choice.logprobs) == len(choice.token_ids)
        expected = [fake_logprob(i, t, 1) for i, t in enumerate(choice.token_ids)]
        assert choice.logprobs == tuple(
            baton.TokenLogprob(e.token_id, e.logprob, e.top) for e in expected)
    assert result.usage.completion_tokens == sum(len(c.token_ids) for c in result.choices)
    sampling = cluster.decode[0].requests[-1].sampling
    assert (sampling.logprobs, sampling.stop_token_ids) == (1, [3])
    assert sampling.repetition_penalty == pytest.approx(1.1)

    chunks = list(sdk.stream("Hi", n=2, seed=1))
    assert {c.index for c in chunks} == {0, 1} and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])


def test_sdk_bad_sampling_names_the_parameter(start_cluster, sdk) -> None:
    start_cluster(num_prefill=0)
    for kwargs, param in [({"presence_penalty": 3.0}, "presence_penalty"),
                          ({"repetition_penalty": 0.0}, "repetition_penalty"),
                          ({"min_p": 2.0}, "min_p"), ({"logprobs": 21}, "logprobs"),
                          ({"n": 0}, "n"), ({"stop_token_ids": [10**7]}, "stop_token_ids")]:
        with pytest.raises(baton.BadRequestError) as info:
            sdk.generate("Hi", **kwargs)
        assert param in info.value.message


# -- usage: cached prompt tokens ------------------------------------------------------------------


@pytest.mark.parametrize("num_prefill, expected", [(0, 16), (1, 32)],
                         ids=["colocated", "disaggregated"])
def test_cached_tokens_reach_the_usage(start_cluster, sdk, num_prefill, expected) -> None:
    # D reports 32 cached tokens in Reserved (REMOTE) and 16 with a LOCAL prefill's first batch.
    start_cluster(num_prefill=num_prefill,
                  behavior=FakeBehavior(num_cached_tokens=32, num_cached_tokens_local=16))
    assert sdk.generate("Hi", max_tokens=3).usage.cached_tokens == expected
    chunks = list(sdk.stream("Hi", max_tokens=3, n=2))
    assert chunks[-1].usage.cached_tokens == expected  # the prompt once: choice 0's hits


def test_cached_tokens_after_falling_back_to_a_local_prefill(start_cluster, oai) -> None:
    behavior = FakeBehavior(num_cached_tokens=32, num_cached_tokens_local=16,
                            prefill_error=(grpc.StatusCode.UNAVAILABLE, "prefill worker is gone"))
    start_cluster(num_prefill=1, behavior=behavior)
    out = oai.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert out.usage.prompt_tokens_details.cached_tokens == 16  # the local prefill's, not Reserved's


# -- completions text_offset with a SentencePiece tokenizer ---------------------------------------


def test_text_offsets_follow_the_detokenized_text(tmp_path) -> None:
    """A lone "▁x" piece decodes without its space; the offsets count the text really added."""
    sp_dir = sentencepiece_dir(tmp_path / "sp")
    sp = Tokenizer.from_dir(sp_dir)
    ids = sp.encode("Hello world! The capital of France is Paris.", add_special_tokens=False)
    expected = [len(sp.decode(ids[:i])) for i in range(len(ids))]
    lone = [len(sp.decode([t])) for t in ids]
    assert expected != [sum(lone[:i]) for i in range(len(ids))]  # the case this test is about
    cluster = FakeCluster.start(reply_script(ids), sp.eos_token_ids, num_prefill=0)
    config = RouterConfig(model_name=MODEL, model_dir=str(sp_dir), http_port=0, grpc_port=0,
                          graceful_shutdown_s=0.5)
    try:
        with Router(config, StaticWorkerDirectory(cluster.infos())) as sp_router:
            client = openai.OpenAI(base_url=f"{sp_router.http_url}/v1", api_key="x",
                                   max_retries=0)
            kwargs = {"model": MODEL, "prompt": "Hi", "max_tokens": len(ids), "logprobs": 1}
            full = client.completions.create(**kwargs).choices[0]
            assert full.text == sp.decode(ids) and full.logprobs.text_offset == expected
            offsets, text = [], ""
            for chunk in client.completions.create(stream=True, **kwargs):
                text += chunk.choices[0].text
                offsets += chunk.choices[0].logprobs.text_offset if chunk.choices[0].logprobs else []
            assert text == full.text and offsets == expected
            client.close()
    finally:
        cluster.stop()
