"""Scheduler core (no torch): token budget, chunked prefill, admission, preemption, finishing."""

import pytest

from engine.block_pool import BlockPool
from engine.radix_cache import BlockRemoved, RadixCache
from engine.request import (
    FinishReason,
    InvalidRequestError,
    NoCapacityError,
    RequestOutput,
    RequestStatus,
    SamplingParams,
)
from engine.scheduler import Scheduler
from engine.sequence import Sequence

pytestmark = pytest.mark.unit

EOS = 99


def make(num_blocks=16, block_size=4, max_num_seqs=8, budget=32, max_model_len=64, cache=False):
    prefix_cache = RadixCache(block_size, enable_events=True) if cache else None
    return Scheduler(
        BlockPool(num_blocks, prefix_cache=prefix_cache), block_size=block_size,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
        eos_token_ids=frozenset([EOS]),
    )


def seq(request_id, num_prompt, prefill_only=False, start=1, **sampling):
    """A sequence whose prompt is start, start + 1, ..., start + num_prompt - 1."""
    sampling.setdefault("max_tokens", 100)
    return Sequence(
        request_id=request_id, token_ids=list(range(start, start + num_prompt)),
        num_prompt_tokens=num_prompt, sampling=SamplingParams(temperature=0, **sampling),
        seed=0, prefill_only=prefill_only,
    )


def plan(scheduled):
    return [(s.seq.request_id, s.num_new_tokens, s.samples) for s in scheduled]


def step(sched, tokens=None):
    """Schedule, then pretend the model sampled token 7 (or tokens[id]) for every sampler."""
    scheduled = sched.schedule()
    sampled = [(tokens or {}).get(s.seq.request_id, 7) if s.samples else None for s in scheduled]
    return plan(scheduled), sched.update(scheduled, sampled)


def test_prefill_is_chunked_by_the_token_budget():
    sched = make(budget=8)
    a = seq("a", 19)
    sched.add(a)
    assert step(sched)[0] == [("a", 8, False)]
    assert a.block_table == [0, 1] and a.num_computed_tokens == 8
    assert step(sched)[0] == [("a", 8, False)]
    got, outputs = step(sched)
    assert got == [("a", 3, True)]
    assert outputs == [RequestOutput("a", [7], None, num_cached_tokens=0)]  # the first token
    assert a.block_table == [0, 1, 2, 3, 4]
    assert step(sched)[0] == [("a", 1, True)]  # decode: the last sampled token
    assert a.output_token_ids == [7, 7]


def test_decodes_go_first_then_waiting_prompts_share_the_rest():
    sched = make(budget=10)
    sched.add(seq("a", 3))
    assert step(sched)[0] == [("a", 3, True)]
    sched.add(seq("b", 6))
    sched.add(seq("c", 6))
    # a decodes (1), b prefills fully (6), c gets the remaining 3 tokens
    assert step(sched)[0] == [("a", 1, True), ("b", 6, True), ("c", 3, False)]
    assert step(sched)[0] == [("a", 1, True), ("b", 1, True), ("c", 3, True)]


def test_max_num_seqs_holds_back_admission():
    sched = make(max_num_seqs=2)
    for name in "abc":
        sched.add(seq(name, 2))
    assert step(sched)[0] == [("a", 2, True), ("b", 2, True)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_admission_waits_for_blocks_in_fifo_order():
    sched = make(num_blocks=4, block_size=4, budget=64)
    sched.add(seq("a", 12))  # 3 blocks
    sched.add(seq("b", 8))  # 2 blocks: does not fit
    sched.add(seq("c", 1))  # would fit, but FIFO keeps it behind b
    assert step(sched)[0] == [("a", 12, True)]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]


def test_preemption_frees_the_latest_running_and_recomputes_it():
    sched = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq("a", 8), seq("b", 7)
    sched.add(a)
    sched.add(b)
    assert step(sched)[0] == [("a", 8, True), ("b", 7, True)]  # 4 blocks used
    # a (9 tokens) needs a third block: b is preempted and goes back to the head of waiting
    got, _ = step(sched)
    assert got == [("a", 1, True)]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and list(sched.waiting) == [b]
    assert a.block_table == [0, 1, 3]  # b's table [2, 3] was freed in reverse
    # when a finishes, b recomputes prompt + its output token, then samples its second token
    sched.abort("a")
    got, _outputs = step(sched)
    assert got == [("b", 8, True)]
    assert b.output_token_ids == [7, 7]


def test_a_sequence_that_can_never_fit_finishes_with_length():
    sched = make(num_blocks=2, block_size=4, budget=64)
    a = seq("a", 7)
    sched.add(a)
    step(sched)  # 8 tokens now, 2 blocks
    got, outputs = step(sched)  # computes the 8th token: still fits
    assert got == [("a", 1, True)]
    got, outputs = step(sched)  # the 9th token needs a third block that does not exist
    assert got == []
    assert outputs == [RequestOutput("a", [], FinishReason.LENGTH)]
    assert sched.block_pool.num_free_blocks == 2 and "a" not in sched.requests


@pytest.mark.parametrize(
    "sampling, tokens, reason, n",
    [
        ({"max_tokens": 3}, [5, 5, 5], FinishReason.LENGTH, 3),
        ({}, [5, EOS], FinishReason.STOP, 2),
        ({"ignore_eos": True, "max_tokens": 4}, [EOS, EOS, 5, 5], FinishReason.LENGTH, 4),
        ({"stop_token_ids": (42,)}, [5, 42], FinishReason.STOP, 2),
    ],
)
def test_finish_reasons(sampling, tokens, reason, n):
    sched = make()
    sched.add(seq("a", 3, **sampling))
    outputs = []
    for token in tokens:
        outputs += step(sched, {"a": token})[1]
    assert [o.new_token_ids[0] for o in outputs] == tokens[:n]
    assert outputs[-1].finish_reason == reason
    assert all(o.finish_reason is None for o in outputs[:-1])
    assert sched.block_pool.num_free_blocks == 16 and not sched.running


def test_context_limit_finishes_with_length():
    sched = make(max_model_len=5)
    sched.add(seq("a", 3))
    assert step(sched)[1] == [RequestOutput("a", [7], None, num_cached_tokens=0)]
    assert step(sched)[1] == [RequestOutput("a", [7], FinishReason.LENGTH)]  # 5 tokens


def test_prefill_only_is_held_until_release():
    sched = make()
    sched.add(seq("p", 5, prefill_only=True))
    _, outputs = step(sched)
    assert outputs == [RequestOutput("p", [7], None, num_cached_tokens=0)]
    held = sched.held["p"]
    assert held.status == RequestStatus.FINISHED and held.block_table == [0, 1]
    assert not sched.running and step(sched)[0] == []
    sched.release("p")
    assert sched.block_pool.num_free_blocks == 16
    with pytest.raises(ValueError):
        sched.release("p")


def test_reserve_commit_joins_the_batch_without_recomputing_the_prompt():
    sched = make()
    d = seq("d", 6)
    sched.reserve(d)
    assert d.status == RequestStatus.WAITING_FOR_KV and d.block_table == [0, 1]
    assert step(sched)[0] == []
    sched.commit("d", 11)
    got, outputs = step(sched)
    assert got == [("d", 1, True)]  # only the first token, at position 6
    assert outputs == [RequestOutput("d", [7], None)]
    assert d.output_token_ids == [11, 7]


def test_commit_of_a_finished_first_token_reports_it_next_step():
    sched = make()
    sched.reserve(seq("d", 6, max_tokens=1))
    sched.commit("d", 11)
    assert step(sched) == ([], [RequestOutput("d", [], FinishReason.LENGTH)])
    assert sched.block_pool.num_free_blocks == 16


def test_reserve_without_room_raises_and_allocates_nothing():
    sched = make(num_blocks=3)
    sched.reserve(seq("a", 8))
    with pytest.raises(NoCapacityError):
        sched.reserve(seq("b", 8))
    assert sched.block_pool.num_free_blocks == 1 and "b" not in sched.requests


def test_prompts_larger_than_the_pool_and_duplicate_ids_are_refused():
    sched = make(num_blocks=2)
    with pytest.raises(InvalidRequestError, match="only 2 blocks"):
        sched.add(seq("a", 8))
    sched.add(seq("b", 3))
    with pytest.raises(InvalidRequestError, match="already in use"):
        sched.add(seq("b", 3))


def test_abort_works_in_every_state_and_frees_blocks():
    sched = make(budget=4)
    sched.add(seq("run", 3))
    step(sched)
    sched.add(seq("wait", 3))
    sched.add(seq("chunk", 9))
    step(sched)  # run decodes, wait prefills, chunk gets nothing yet
    sched.reserve(seq("kv", 4))
    sched.add(seq("held", 1, prefill_only=True))
    for name in ("run", "wait", "chunk", "kv"):
        assert sched.abort(name)
    step(sched)
    assert "held" in sched.held
    assert sched.abort("held")
    assert not sched.abort("nobody")
    assert sched.block_pool.num_free_blocks == 16
    assert not (sched.running or sched.waiting or sched.reserved or sched.held or sched.requests)


# ---------------------------------------------------------------------------------- prefix cache


def test_a_prefix_hit_skips_the_cached_blocks():
    sched = make(cache=True)
    sched.add(seq("a", 10, max_tokens=1))
    assert step(sched)[0] == [("a", 10, True)]  # finished: blocks 2, 1, 0 freed in that order
    assert sched.prefix_cache.match(list(range(1, 11))) == [0, 1]  # the partial block 2 is not
    b = seq("b", 13)
    sched.add(b)
    assert step(sched)[0] == [("b", 5, True)]  # tokens 1..8 were cached
    assert b.block_table == [0, 1, 3, 4] and b.num_computed_tokens == 13
    assert sched.block_pool.free_block_ids()[-1:] == [2]
    assert (sched.stats.prefix_cache_queries, sched.stats.prefix_cache_hits) == (10 + 13, 8)
    assert b.num_cached_blocks == 3  # 9..12 became full and is registered
    assert sched.prefix_cache.match(list(range(1, 14))) == [0, 1, 3]


def test_the_same_prompt_twice_keeps_the_last_token_to_compute():
    sched = make(cache=True)
    a, a2 = seq("a", 8), seq("a2", 8)
    sched.add(a)
    step(sched)
    assert a.num_cached_blocks == 2
    sched.add(a2)
    # a2 looks up 7 tokens: one full block; block 1 is recomputed so a2 gets logits at token 8
    assert step(sched)[0] == [("a", 1, True), ("a2", 4, True)]
    assert a.block_table == [0, 1, 2] and a2.block_table == [0, 3]
    assert sched.block_pool.ref_cnt[:4] == [2, 1, 1, 1]
    assert a2.num_cached_blocks == 1 and 3 not in sched.prefix_cache  # a private copy of block 1
    assert sched.stats.prefix_cache_hits == 4


def test_admission_counts_cached_free_hits_against_the_free_blocks():
    sched = make(num_blocks=4, block_size=4, budget=64, cache=True)
    a, b = seq("a", 8), seq("b", 7, start=101)
    sched.add(a)
    sched.add(b)
    assert step(sched)[0] == [("a", 8, True), ("b", 7, True)]
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    assert sched.prefix_cache.match(b.token_ids) == [2]
    # a needs a third block: b is preempted, its blocks freed in reverse (3 is not cached)
    assert step(sched)[0] == [("a", 1, True)]
    assert a.block_table == [0, 1, 3] and sched.block_pool.free_block_ids() == [2]
    assert sched.stats.num_preemptions == 1
    # b would hit its cached block 2 but also need a new one: 2 blocks, 1 free: it waits
    assert step(sched)[0] == [("a", 1, True)]
    assert list(sched.waiting) == [b] and sched.block_pool.free_block_ids() == [2]
    sched.abort("a")
    assert sched.block_pool.free_block_ids() == [2, 3, 1, 0]
    assert step(sched)[0] == [("b", 4, True)]  # recomputes only tokens 105..107 and its output
    assert b.block_table == [2, 3] and b.output_token_ids == [7, 7]
    assert sched.stats.prefix_cache_hits == 4
    assert sched.block_pool.free_block_ids() == [1, 0]


def test_allocation_evicts_the_least_recently_freed_cached_blocks():
    sched = make(num_blocks=6, block_size=4, budget=64, cache=True)
    for name, start in (("a", 1), ("b", 101)):
        sched.add(seq(name, 8, start=start, max_tokens=1))
        step(sched)
    # a freed [1, 0] (after the untouched 4, 5), then b freed [3, 2]
    assert sched.block_pool.free_block_ids() == [4, 5, 1, 0, 3, 2]
    sched.add(seq("c", 16, start=201, max_tokens=1))
    assert step(sched)[0] == [("c", 16, True)]
    assert sched.requests == {} and sched.prefix_cache.match(list(range(1, 9))) == []
    assert sched.prefix_cache.match(list(range(101, 109))) == [2, 3]
    removed = [e for e in sched.prefix_cache.take_events() if isinstance(e, BlockRemoved)]
    assert len(removed) == 1 and len(removed[0].block_hashes) == 2  # a's two blocks


def test_prefill_only_hits_its_own_cache_and_keeps_the_shared_blocks_until_release():
    sched = make(cache=True)
    sched.add(seq("p1", 10, prefill_only=True))
    step(sched)
    sched.release("p1")
    p2 = seq("p2", 10, prefill_only=True)
    sched.add(p2)
    assert step(sched)[0] == [("p2", 2, True)]
    assert sched.held["p2"].block_table == [0, 1, 3]
    assert sched.block_pool.ref_cnt[:2] == [1, 1]
    sched.release("p2")
    assert sched.block_pool.num_free_blocks == 16


def test_reserve_takes_the_cached_prompt_blocks_and_registers_the_rest_at_commit():
    sched = make(cache=True)
    d1, d2 = seq("d1", 8), seq("d2", 8)
    assert sched.reserve(d1) == 0 and d1.block_table == [0, 1]
    assert sched.reserve(d2) == 0  # d1's K/V has not arrived: nothing is cached before commit
    assert sched.stats.prefix_cache_queries == 16 and sched.stats.prefix_cache_hits == 0
    sched.commit("d1", 11)
    assert d1.num_cached_blocks == 2
    d3 = seq("d3", 10)
    free_before = sched.block_pool.num_free_blocks
    assert sched.reserve(d3) == 8  # the whole prompt of d1; 9..10 must still be written
    assert d3.block_table == [0, 1, 4] and d3.num_computed_tokens == 8
    assert sched.block_pool.num_free_blocks == free_before - 1
    assert sched.stats.prefix_cache_hits == 8
    sched.abort("d1")
    d4 = seq("d4", 8)
    assert sched.reserve(d4) == 8 and d4.block_table == [0, 1]  # cached entirely
    sched.commit("d4", 12)
    assert step(sched)[0] == [("d4", 1, True)]  # only position 8: no prompt token recomputed
    assert d4.output_token_ids == [12, 7]


def test_reserve_counts_cached_free_hits_before_allocating():
    sched = make(num_blocks=4, cache=True)
    sched.add(seq("a", 8, max_tokens=1))
    step(sched)  # blocks 0, 1 cached-free, blocks 2, 3 empty
    sched.reserve(seq("x", 8, start=50))  # takes blocks 2, 3
    with pytest.raises(NoCapacityError, match="needs 3 KV blocks, 2 are free"):
        sched.reserve(seq("d", 12))  # hits 0, 1 and needs one more block
    assert sched.block_pool.free_block_ids() == [1, 0] and "d" not in sched.requests
    assert sched.reserve(seq("d", 8)) == 8


def test_a_blocked_head_resumes_its_lookup_and_never_takes_an_evicted_block():
    sched = make(num_blocks=4, block_size=4, budget=64, cache=True)
    sched.add(seq("a", 8, max_tokens=1))
    step(sched)  # a's blocks 1, 0 are cached-free at the tail: [2, 3, 1, 0]
    c = seq("c", 5, start=50)
    sched.add(c)
    step(sched)  # c holds [2, 3]: room for 8 tokens
    b = seq("b", 13)  # would hit 0, 1 and need 2 more blocks: 4 taken, 2 free
    sched.add(b)
    assert step(sched)[0] == [("c", 1, True)]
    kept = b.prefix_match
    assert kept.block_ids == [0, 1] and list(sched.waiting) == [b]
    for _ in range(2):  # c computes its 7th and 8th tokens: nothing is evicted
        assert step(sched)[0] == [("c", 1, True)]
        assert b.prefix_match.block_ids is kept.block_ids  # resumed from its node, not walked
    # c's 9th token takes block 1 from the free list's head, evicting it before b looks again.
    assert step(sched)[0] == [("c", 1, True)] and c.block_table == [2, 3, 1]
    assert b.prefix_match.block_ids == [0] and 1 not in sched.prefix_cache
    sched.abort("c")
    assert step(sched)[0] == [("b", 9, True)]  # only block 0 was still cached
    assert b.block_table[0] == 0 and b.prefix_match is None
    assert sched.stats.prefix_cache_hits == 4
    assert sched.block_pool.ref_cnt == [1, 1, 1, 1]


def test_the_prefix_cache_comes_with_the_pool_and_must_share_its_block_size():
    with pytest.raises(ValueError, match="block_size 2 != block_size 4"):
        Scheduler(BlockPool(4, prefix_cache=RadixCache(2)), block_size=4, max_num_seqs=1,
                  max_num_batched_tokens=8, max_model_len=8, eos_token_ids=frozenset())
    sched = make(cache=True)
    assert sched.prefix_cache is sched.block_pool.prefix_cache is not None
    assert make().prefix_cache is None


def test_the_first_output_reports_the_prompt_tokens_found_cached():
    sched = make(cache=True)
    sched.add(seq("a", 9, max_tokens=2))
    outputs = []
    while sched.waiting or sched.running:
        outputs += step(sched)[1]
    assert [o.num_cached_tokens for o in outputs] == [0, None]
    sched.add(seq("b", 9, max_tokens=2))  # the same prompt: its first two blocks are cached
    outputs = []
    while sched.waiting or sched.running:
        outputs += step(sched)[1]
    assert [o.num_cached_tokens for o in outputs] == [8, None]
