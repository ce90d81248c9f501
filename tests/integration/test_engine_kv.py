"""KV hand-off between engines: prefill_only + read_kv on one, reserve/write_kv/commit on another.

The decode side must continue token-identical to transformers (greedy) and to colocated seeded
sampling, never recomputing the last prompt position; bad writes are refused before any byte lands.
"""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import FinishReason, InvalidRequestError, NoCapacityError, SamplingParams
from tests.support.models import hf_generate_greedy, tiny_model

pytestmark = pytest.mark.integration

NAME = "llama-gqa"
NUM_NEW = 16


def new_engine(**kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory_bytes", 2 << 20)
    return LLMEngine(EngineConfig(model=str(tiny_model(NAME)), **kw))


def prompts(n=4, lens=(5, 16, 37, 120)):
    rng = random.Random(99)
    return [[rng.randrange(300) for _ in range(length)] for length in lens[:n]]


def drain(engine: LLMEngine) -> tuple[dict, dict]:
    tokens, reasons = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason
    return tokens, reasons


def prefill(engine: LLMEngine, request_id, prompt, sampling) -> tuple[int, FinishReason | None]:
    engine.add_request(request_id, prompt, sampling, prefill_only=True)
    tokens, reasons = drain(engine)
    assert len(tokens[request_id]) == 1
    return tokens[request_id][0], reasons.get(request_id)


def transfer(p: LLMEngine, d: LLMEngine, request_id, prompt, layer_step=1, token_step=7):
    """Copy the prompt's KV from p to d in (layer, token) chunks."""
    num_layers = p.model_config.num_layers
    for layer in range(0, num_layers, layer_step):
        layer_end = min(layer + layer_step, num_layers)
        for start in range(0, len(prompt), token_step):
            end = min(start + token_step, len(prompt))
            k, v = p.read_kv(request_id, layer, layer_end, start, end)
            assert k.device.type == "cpu" and k.is_contiguous()
            assert k.shape == (layer_end - layer, end - start, p.model_config.num_kv_heads,
                               p.model_config.head_dim)
            d.write_kv(request_id, layer, layer_end, start, end, k, v)


def test_disaggregated_greedy_matches_transformers():
    p, d = new_engine(), new_engine(max_num_batched_tokens=32)
    sampling = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    firsts = {}
    for i, prompt in enumerate(prompts()):
        rid = f"r{i}"
        first, reason = prefill(p, rid, prompt, sampling)
        assert reason is None
        assert d.reserve(rid, prompt, sampling) == 0
        assert d.num_waiting == 1  # WAITING_FOR_KV counts as waiting
        transfer(p, d, rid, prompt, layer_step=1 + i % 2)
        p.release(rid)
        d.commit(rid, first)
        assert d.num_waiting == 0 and d.num_running == i + 1
        firsts[rid] = first
    assert p.num_free_blocks == p.num_total_blocks
    tokens, reasons = drain(d)
    for i, prompt in enumerate(prompts()):
        rid = f"r{i}"
        assert [firsts[rid]] + tokens[rid] == hf_generate_greedy(tiny_model(NAME), prompt, NUM_NEW)
        assert reasons[rid] == FinishReason.LENGTH
    assert d.num_free_blocks == d.num_total_blocks


def test_read_kv_equals_transformers_cache():
    p = new_engine()
    prompt = prompts()[2]
    prefill(p, "x", prompt, SamplingParams(temperature=0, max_tokens=4))
    k, v = p.read_kv("x", 0, p.model_config.num_layers, 0, len(prompt))
    model = AutoModelForCausalLM.from_pretrained(tiny_model(NAME), dtype=torch.float32)
    with torch.inference_mode():
        cache = model(torch.tensor([prompt]), use_cache=True).past_key_values
    for layer in range(p.model_config.num_layers):
        hf_k, hf_v = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [Hkv, T, D]
        torch.testing.assert_close(k[layer], hf_k.transpose(0, 1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v[layer], hf_v.transpose(0, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="token range"):
        p.read_kv("x", 0, 1, 0, len(prompt) + 2)
    with pytest.raises(ValueError, match="layer range"):
        p.read_kv("x", 0, 9, 0, 1)
    with pytest.raises(ValueError, match="unknown"):
        p.read_kv("nobody", 0, 1, 0, 1)


def test_seeded_sampling_is_the_same_colocated_and_disaggregated():
    sampling = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12,
                              ignore_eos=True)
    prompt = prompts()[1]
    colocated = new_engine()
    colocated.add_request("s", prompt, sampling)
    expected = drain(colocated)[0]["s"]
    p, d = new_engine(), new_engine()
    first, _ = prefill(p, "s", prompt, sampling)
    d.reserve("s", prompt, sampling)
    transfer(p, d, "s", prompt, layer_step=2, token_step=16)
    d.commit("s", first)
    assert [first] + drain(d)[0]["s"] == expected
    other = new_engine()
    other.add_request("s", prompt, SamplingParams(**{**sampling.__dict__, "seed": 4321}))
    assert drain(other)[0]["s"] != expected


def test_first_token_that_finishes_is_reported_by_the_next_step():
    p, d = new_engine(), new_engine()
    sampling = SamplingParams(temperature=0, max_tokens=1)
    prompt = prompts()[0]
    first, reason = prefill(p, "one", prompt, sampling)
    assert reason == FinishReason.LENGTH  # P reports the finish with the token, keeps the blocks
    assert p.num_free_blocks < p.num_total_blocks
    d.reserve("one", prompt, sampling)
    transfer(p, d, "one", prompt)
    p.release("one")
    d.commit("one", first)
    assert d.has_unfinished()
    outputs = d.step()
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outputs] == [
        ("one", [], FinishReason.LENGTH)
    ]
    assert not d.has_unfinished() and d.num_free_blocks == d.num_total_blocks


def test_write_kv_validates_before_writing():
    d = new_engine()
    mc = d.model_config
    prompt = prompts()[1]  # 16 tokens
    sampling = SamplingParams(temperature=0)
    d.reserve("w", prompt, sampling)
    shape = (1, 4, mc.num_kv_heads, mc.head_dim)
    good = torch.ones(shape)
    before = [c.clone() for c in d.kv_cache.k_caches]
    bad_calls = [
        (("nobody", 0, 1, 0, 4, good, good), "not waiting for KV"),
        (("w", 0, 1, 14, 18, good, good), "token range"),
        (("w", 0, mc.num_layers + 1, 0, 4, good, good), "layer range"),
        (("w", 0, 1, 0, 4, torch.ones(1, 3, mc.num_kv_heads, mc.head_dim), good), "shape"),
        (("w", 0, 1, 0, 4, good, torch.ones(shape, dtype=torch.int64)), "float dtype"),
    ]
    for args, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            d.write_kv(*args)
    assert all(torch.equal(a, b) for a, b in zip(before, d.kv_cache.k_caches))
    d.write_kv("w", 0, 1, 0, 4, good.to(torch.float16), good.to(torch.bfloat16))  # cast
    with pytest.raises(ValueError, match="not waiting for KV"):
        d.commit("nobody", 1)
    with pytest.raises(ValueError, match="vocabulary"):
        d.commit("w", mc.vocab_size)
    assert d.abort("w") and d.num_free_blocks == d.num_total_blocks


def test_reserve_refuses_when_full_and_validates():
    d = new_engine(max_model_len=200)
    block_bytes = d.block_size * d.kv_bytes_per_token
    small = new_engine(kv_cache_memory_bytes=4 * block_bytes)
    sampling = SamplingParams(temperature=0)
    small.reserve("a", [1] * 40, sampling)  # 3 of 4 blocks
    with pytest.raises(NoCapacityError):
        small.reserve("b", [1] * 40, sampling)
    assert small.num_free_blocks == 1
    with pytest.raises(InvalidRequestError, match="context"):
        d.reserve("long", [1] * 200, sampling)
    with pytest.raises(InvalidRequestError, match="already in use"):
        small.reserve("a", [1] * 4, sampling)


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=NUM_NEW, ignore_eos=True,
                   frequency_penalty=0.5, presence_penalty=0.3),
], ids=["greedy", "seeded-with-penalties"])
def test_a_request_resumed_from_its_outputs_continues_with_the_same_tokens(sampling):
    """A decode worker that fails after k tokens: another engine, given the prompt and those k
    outputs, generates exactly the rest (the same sampler positions and penalty counts), and
    max_tokens counts the k."""
    engine = new_engine()
    prompt = prompts(n=3)[2]
    engine.add_request("whole", prompt, sampling)
    whole = drain(engine)[0]["whole"]
    assert len(whole) == NUM_NEW
    for k in (1, 5, NUM_NEW - 1):
        engine.add_request(f"resumed-{k}", prompt, sampling, output_token_ids=whole[:k])
        tokens, reasons = drain(engine)
        assert whole[:k] + tokens[f"resumed-{k}"] == whole, k
        assert reasons[f"resumed-{k}"] is FinishReason.LENGTH


def test_resuming_refuses_outputs_that_leave_nothing_to_generate():
    engine = new_engine()
    sampling = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="leave nothing to generate"):
        engine.add_request("r", [5, 6, 7], sampling, output_token_ids=[1, 2, 3, 4])
    with pytest.raises(InvalidRequestError, match=r"output_token_ids token ids must be in"):
        engine.add_request("r", [5, 6, 7], sampling, output_token_ids=[10**9])
    assert not engine.has_unfinished()
