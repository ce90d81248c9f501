"""Greedy output of LLMEngine is token-identical to transformers generate() (float32).

Every tiny architecture (GQA, MHA with tied embeddings, MQA, Qwen2 with qkv bias, Mistral), eight
prompts of 1..300 tokens under continuous batching (half join while the others run), with and
without chunked prefill (chunks of 1, 7, 32 and 64 tokens), after preemptions forced by a small KV
pool, and for one prompt alone or among 32. Seeded sampling gives the same tokens alone and batched.
"""

import functools
import json
import logging
import random
import shutil

import pytest

from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.request import FinishReason, InvalidRequestError, SamplingParams
from tests.support.models import TINY_MODELS, hf_generate_greedy, tiny_model

pytestmark = pytest.mark.integration

PROMPT_LENS = (1, 2, 15, 16, 17, 33, 100, 300)
NUM_NEW = 20
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


def prompts_for(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in PROMPT_LENS]


@functools.cache
def reference(name: str) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, HF greedy continuations) for a tiny preset."""
    model_dir = tiny_model(name)
    prompts = prompts_for(ModelConfig.from_dir(model_dir).vocab_size)
    return prompts, [hf_generate_greedy(model_dir, p, NUM_NEW) for p in prompts]


def run_continuous(engine: LLMEngine, prompts: list[list[int]], sampling=GREEDY) -> dict:
    """Add half the prompts, step a few times, add the rest; run until done."""
    outputs = {i: [] for i in range(len(prompts))}
    reasons = {}
    half = len(prompts) // 2
    for i in range(half):
        engine.add_request(str(i), prompts[i], sampling)
    num_steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            outputs[int(out.request_id)] += out.new_token_ids
            if out.finish_reason is not None:
                reasons[int(out.request_id)] = out.finish_reason
        num_steps += 1
        if num_steps == 3:
            for i in range(half, len(prompts)):
                engine.add_request(str(i), prompts[i], sampling)
    assert num_steps > 3
    assert set(reasons) == set(outputs)
    return outputs


def engine_for(name: str, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory_bytes", 4 << 20)
    return LLMEngine(EngineConfig(model=str(tiny_model(name)), **kw))


@pytest.mark.parametrize("budget", [2048, 32], ids=["whole-prefill", "chunked-prefill"])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_greedy_matches_transformers(name, budget):
    prompts, expected = reference(name)
    engine = engine_for(name, max_num_batched_tokens=budget)
    outputs = run_continuous(engine, prompts)
    for i, prompt in enumerate(prompts):
        assert outputs[i] == expected[i], f"prompt {i} ({len(prompt)} tokens)"
    assert engine.num_free_blocks == engine.num_total_blocks
    assert engine.num_running == engine.num_waiting == 0


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
def test_greedy_matches_transformers_with_small_prefill_chunks(name, chunk):
    """The step budget caps every prefill chunk (and, at 1, lets one sequence advance per step)."""
    prompts, expected = reference(name)
    engine = engine_for(name, max_num_batched_tokens=chunk)
    outputs = run_continuous(engine, prompts)
    for i, prompt in enumerate(prompts):
        assert outputs[i] == expected[i], f"prompt {i} ({len(prompt)} tokens), chunk {chunk}"
    assert engine.num_free_blocks == engine.num_total_blocks


def run_batch(engine: LLMEngine, prompts: list[list[int]], samplings: list[SamplingParams]) -> list:
    for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
        engine.add_request(str(i), prompt, sampling)
    outputs = [[] for _ in prompts]
    while engine.has_unfinished():
        for out in engine.step():
            outputs[int(out.request_id)] += out.new_token_ids
    return outputs


def test_one_prompt_alone_and_among_32_gives_the_same_greedy_tokens():
    name = "llama-gqa"
    model_dir = tiny_model(name)
    prompts, expected = reference(name)
    target = prompts[6]  # 100 tokens
    rng = random.Random(99)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    others = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 200))] for _ in range(31)]
    batch = others[:13] + [target] + others[13:]
    alone = run_batch(engine_for(name), [target], [GREEDY])[0]
    batched = run_batch(engine_for(name, kv_cache_memory_bytes=16 << 20), batch, [GREEDY] * 32)
    assert alone == expected[6]
    assert batched[13] == expected[6]
    assert all(len(out) == NUM_NEW for out in batched)


def test_seeded_sampling_gives_the_same_tokens_alone_and_in_a_batch():
    name = "llama-mha-tied"
    prompts, _ = reference(name)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=2024, max_tokens=NUM_NEW,
                            ignore_eos=True)
    alone = run_batch(engine_for(name), [prompts[4]], [seeded])[0]
    rng = random.Random(5)
    samplings = [
        SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.8]),
                       seed=rng.choice([None, rng.randrange(1000)]), max_tokens=NUM_NEW,
                       ignore_eos=True)
        for _ in range(len(prompts))
    ]
    samplings[4] = seeded
    batched = run_batch(engine_for(name), prompts, samplings)
    assert batched[4] == alone
    again = run_batch(engine_for(name), [prompts[4]], [seeded])[0]
    assert again == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=2025,
                                max_tokens=NUM_NEW, ignore_eos=True)
    assert run_batch(engine_for(name), [prompts[4]], [other_seed])[0] != alone  # the seed matters


def test_preemption_keeps_greedy_output_identical(caplog):
    name = "llama-gqa"
    model_dir = tiny_model(name)
    rng = random.Random(7)
    probe = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_bytes=1 << 20))
    # Six one-block prompts fill 6 of 8 blocks; their first decodes all need a second block.
    prompts = [[rng.randrange(probe.model_config.vocab_size) for _ in range(16)] for _ in range(6)]
    expected = [hf_generate_greedy(model_dir, p, NUM_NEW) for p in prompts]
    engine = engine_for(name, kv_cache_memory_bytes=8 * 16 * probe.kv_bytes_per_token)
    assert engine.num_total_blocks == 8
    outputs = {i: [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    with caplog.at_level(logging.INFO, logger="engine.scheduler"):
        while engine.has_unfinished():
            for out in engine.step():
                outputs[int(out.request_id)] += out.new_token_ids
    assert caplog.text.count("preempted") >= 3
    assert [outputs[i] for i in range(len(prompts))] == expected
    assert engine.num_free_blocks == 8


def test_stop_token_and_context_limit():
    name = "llama-mqa"
    prompts, expected = reference(name)
    stop = expected[2][4]
    first = expected[2].index(stop)
    engine = engine_for(name, max_model_len=40)
    engine.add_request("stop", prompts[2], SamplingParams(temperature=0, max_tokens=50,
                                                          stop_token_ids=(stop,)))
    engine.add_request("ctx", prompts[5], SamplingParams(temperature=0, max_tokens=50,
                                                         ignore_eos=True))  # 33-token prompt
    outputs, reasons = {"stop": [], "ctx": []}, {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            reasons[out.request_id] = out.finish_reason
    assert outputs["stop"] == expected[2][: first + 1]
    assert reasons["stop"] == FinishReason.STOP
    assert outputs["ctx"] == expected[5][:7]  # 33 + 7 = 40 = max_model_len
    assert reasons["ctx"] == FinishReason.LENGTH


def test_eos_stops_unless_ignored(tmp_path):
    name = "llama-gqa"
    prompts, expected = reference(name)
    # A copy of the model whose EOS is a token the reference emits at step 5.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model(name), model_dir)
    eos = expected[3][5]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    cut = expected[3].index(eos)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory_bytes=4 << 20))
    assert engine.eos_token_ids == frozenset([eos])
    engine.add_request("stops", prompts[3], SamplingParams(temperature=0, max_tokens=NUM_NEW))
    engine.add_request("ignores", prompts[3], GREEDY)
    outputs, reasons = {"stops": [], "ignores": []}, {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            reasons[out.request_id] = out.finish_reason
    assert outputs["stops"] == expected[3][: cut + 1]
    assert reasons["stops"] == FinishReason.STOP
    assert outputs["ignores"] == expected[3]
    assert reasons["ignores"] == FinishReason.LENGTH


def test_abort_frees_blocks_midway():
    engine = engine_for("llama-gqa", max_num_batched_tokens=32)
    prompts, _ = reference("llama-gqa")
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    engine.step()
    engine.step()
    assert engine.num_free_blocks < engine.num_total_blocks
    assert engine.kv_usage > 0
    for i in range(len(prompts)):
        assert engine.abort(str(i))
    assert not engine.abort("0")
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == engine.num_total_blocks and engine.kv_usage == 0.0


def test_engine_properties_and_validation():
    engine = engine_for("llama-gqa", max_model_len=64)
    mc = engine.model_config
    assert engine.kv_bytes_per_token == 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4
    assert engine.num_total_blocks == (4 << 20) // (16 * engine.kv_bytes_per_token)
    assert engine.block_size == 16 and engine.max_model_len == 64
    assert str(engine.kv_dtype) == "torch.float32"
    assert engine.eos_token_ids  # from generation_config.json
    with pytest.raises(InvalidRequestError, match="context is 64 tokens"):
        engine.add_request("long", [1] * 64, GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        engine.add_request("oov", [mc.vocab_size], GREEDY)
    engine.add_request("ok", [1, 2], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("ok", [1, 2], GREEDY)
    assert engine.num_waiting == 1 and engine.num_running == 0


def test_step_timing_tells_prefill_from_decode():
    engine = engine_for("llama-gqa")
    prompt = list(range(3, 3 + 33))  # two full blocks and one token
    sampling = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    phases = []
    for request_id in ("cold", "cached"):
        engine.add_request(request_id, prompt, sampling)
        while engine.has_unfinished():
            engine.step()
            phases.append((request_id, engine.last_step.is_prefill, engine.last_step.num_tokens))
    # Cold: the whole prompt, then two decodes. Cached: one prompt token after a 32-token hit is
    # still prefill work.
    assert phases == [("cold", True, 33), ("cold", False, 1), ("cold", False, 1),
                      ("cached", True, 1), ("cached", False, 1), ("cached", False, 1)]
    assert engine.last_step.seconds > 0
