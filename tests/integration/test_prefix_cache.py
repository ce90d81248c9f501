"""Prefix caching in the engine: greedy output stays token-identical to transformers (float32) when
prompts hit cached blocks -- a shared prefix, the same prompt twice, a hit followed by a chunked
prefill, prompts sharing a prefix in one batch -- and on the disaggregated path, where the decode
engine reports the cached prefix, the prefill engine skips its own, and only the missing tokens'
K/V travel.
"""

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.radix_cache import BlockStored, block_hashes
from engine.request import SamplingParams
from tests.support.models import hf_generate_greedy, tiny_model

pytestmark = pytest.mark.integration

NAME = "llama-gqa"
NUM_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


def new_engine(**kw) -> LLMEngine:
    kw.setdefault("kv_cache_memory_bytes", 2 << 20)
    return LLMEngine(EngineConfig(model=str(tiny_model(NAME)), **kw))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(300) for _ in range(n)]


def expected(prompt: list[int]) -> list[int]:
    return hf_generate_greedy(tiny_model(NAME), prompt, NUM_NEW)


def run(engine: LLMEngine, requests: dict[str, list[int]]) -> dict[str, list[int]]:
    for rid, prompt in requests.items():
        engine.add_request(rid, prompt, GREEDY)
    outputs = {rid: [] for rid in requests}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    return outputs


def hits(engine: LLMEngine) -> int:
    return engine.stats.prefix_cache_hits


def test_greedy_is_identical_after_prefix_hits():
    rng = random.Random(3)
    base = tokens(rng, 50)
    shared = base[:40] + tokens(rng, 21)  # shares 2 full blocks (32 tokens) with base
    long_hit = base[:48] + tokens(rng, 70)  # shares 3 blocks, then a chunked prefill
    engine = new_engine()
    assert run(engine, {"base": base})["base"] == expected(base)
    assert hits(engine) == 0 and engine.stats.prefix_cache_queries == 50
    assert run(engine, {"shared": shared})["shared"] == expected(shared)
    assert hits(engine) == 32
    # The same prompt again: 49 tokens are looked up, 3 blocks (48 tokens) hit.
    assert run(engine, {"again": base})["again"] == expected(base)
    assert hits(engine) == 32 + 48
    chunked = new_engine(max_num_batched_tokens=7)
    run(chunked, {"warm": base})
    assert run(chunked, {"long": long_hit})["long"] == expected(long_hit)
    assert hits(chunked) == 48
    for e in (engine, chunked):
        assert e.num_free_blocks == e.num_total_blocks


def test_greedy_is_identical_for_prompts_sharing_a_prefix_in_one_batch():
    """Computed concurrently, the shared blocks are duplicated; later prompts still hit."""
    rng = random.Random(4)
    system = tokens(rng, 35)
    prompts = {f"q{i}": system + tokens(rng, 5 + 9 * i) for i in range(4)}
    engine = new_engine(max_num_batched_tokens=64)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, GREEDY)
    outputs = {rid: [] for rid in prompts}
    for out in engine.step():  # q0's 40 tokens and q1's first 24: both compute the system blocks
        outputs[out.request_id] += out.new_token_ids
    q0, q1 = engine.scheduler.running
    assert (q0.request_id, q1.request_id) == ("q0", "q1")
    assert q0.num_cached_blocks == 2 and q1.num_cached_blocks == 0
    assert engine.prefix_cache.match(system) == q0.block_table[:2]
    duplicates = q1.block_table[:1]  # q1 computed block 0 too (block 1 only partly): a copy
    assert duplicates[0] not in q0.block_table and duplicates[0] not in engine.prefix_cache
    for out in engine.step():  # q1 finishes its prompt; q2 and q3 are admitted on q0's blocks
        outputs[out.request_id] += out.new_token_ids
    assert q1.block_table[:2] != q0.block_table[:2] and q1.num_cached_blocks == 0
    assert [s.block_table[:2] for s in engine.scheduler.running[2:]] == [q0.block_table[:2]] * 2
    assert hits(engine) == 2 * 32
    for rid, new in drain(engine).items():
        outputs[rid] += new
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected(prompt), rid
    follow_up = {"f": prompts["q2"] + outputs["q2"][:8] + tokens(rng, 3)}  # 66 tokens shared
    before = hits(engine)
    assert run(engine, follow_up)["f"] == expected(follow_up["f"])
    assert hits(engine) - before == 64  # 4 blocks of q2's prompt (58 tokens) and output
    assert engine.num_free_blocks == engine.num_total_blocks


def test_prefix_caching_can_be_switched_off():
    rng = random.Random(5)
    prompt = tokens(rng, 40)
    engine = new_engine(enable_prefix_caching=False)
    assert engine.prefix_cache is None
    assert run(engine, {"a": prompt})["a"] == run(engine, {"b": prompt})["b"] == expected(prompt)
    assert engine.stats.prefix_cache_queries == engine.stats.prefix_cache_hits == 0
    assert engine.take_kv_events() == []


def test_preemption_with_cached_blocks_keeps_greedy_identical():
    rng = random.Random(6)
    probe = new_engine()
    engine = new_engine(kv_cache_memory_bytes=10 * 16 * probe.kv_bytes_per_token)
    assert engine.num_total_blocks == 10
    # Three 3-block prompts fill 9 of 10 blocks; each needs a fourth block at its 48th token.
    prompts = {str(i): tokens(rng, 40) for i in range(3)}
    outputs = run(engine, prompts)
    assert engine.stats.num_preemptions >= 1
    assert engine.stats.prefix_cache_hits > 0  # a recompute found its own cached blocks
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected(prompt), rid
    assert engine.num_free_blocks == 10


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    return outputs


def disaggregated(p: LLMEngine, d: LLMEngine, rid: str, prompt: list[int], writes: list) -> list:
    """The decode worker's protocol: reserve on D, prefill on P, send [cached, len), commit."""
    num_cached = d.reserve(rid, prompt, GREEDY)
    p.add_request(rid, prompt, GREEDY, prefill_only=True)
    [first] = drain(p)[rid]
    num_layers = p.model_config.num_layers
    for start in range(num_cached, len(prompt), 16):
        end = min(start + 16, len(prompt))
        k, v = p.read_kv(rid, 0, num_layers, start, end)
        writes.append((rid, start, end))
        d.write_kv(rid, 0, num_layers, start, end, k, v)
    p.release(rid)
    d.commit(rid, first)
    return [first] + drain(d)[rid]


def test_disaggregated_sends_only_what_the_decode_engine_lacks():
    rng = random.Random(7)
    base = tokens(rng, 40)
    p, d = new_engine(), new_engine(enable_kv_events=True)
    writes: list[tuple[str, int, int]] = []
    assert disaggregated(p, d, "r0", base, writes) == expected(base)
    assert writes == [("r0", 0, 16), ("r0", 16, 32), ("r0", 32, 40)]
    # At commit, the prompt's 2 full blocks; during decode, the block of tokens 32..47.
    stored = [e for e in d.take_kv_events() if isinstance(e, BlockStored)]
    assert [len(e.block_hashes) for e in stored] == [2, 1]
    assert stored[0].parent_block_hash is None and stored[0].token_ids == tuple(base[:32])
    assert stored[1].parent_block_hash == stored[0].block_hashes[-1]
    sequence = base + expected(base)
    assert list(stored[0].block_hashes + stored[1].block_hashes) == block_hashes(sequence[:48], 16)

    shared = base[:32] + tokens(rng, 20)
    writes.clear()
    p_hits, d_hits = hits(p), hits(d)
    assert disaggregated(p, d, "r1", shared, writes) == expected(shared)
    assert writes == [("r1", 32, 48), ("r1", 48, 52)]  # D already held tokens 0..31
    assert hits(d) - d_hits == 32 and hits(p) - p_hits == 32  # P skipped them too

    whole = base[:32]  # every block cached on D: only the first token travels
    writes.clear()
    assert disaggregated(p, d, "r2", whole, writes) == expected(whole)
    assert writes == []
    for e in (p, d):
        assert e.num_free_blocks == e.num_total_blocks
    assert p.take_kv_events() == []  # events are recorded only for a consumer that asked


def test_write_kv_refuses_tokens_the_decode_engine_caches():
    rng = random.Random(8)
    prompt = tokens(rng, 20)
    p, d = new_engine(), new_engine()
    disaggregated(p, d, "r0", prompt, [])
    assert d.reserve("r1", prompt, GREEDY) == 16
    mc = d.model_config
    zeros = torch.zeros(mc.num_layers, 4, mc.num_kv_heads, mc.head_dim)
    with pytest.raises(ValueError, match="starts below the 16 prompt tokens cached here"):
        d.write_kv("r1", 0, mc.num_layers, 12, 16, zeros, zeros)
    d.write_kv("r1", 0, mc.num_layers, 16, 20, zeros, zeros)
    assert d.abort("r1") and d.num_free_blocks == d.num_total_blocks
