"""The real Scheduler, pool and prefix cache driven through random operations (add, steps with
fake sampled tokens, reserve/commit, abort, release, prefill_only, preemption in a small pool),
with the block-accounting and prefix-cache invariants checked after every operation."""

from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool
from engine.radix_cache import RadixCache
from engine.request import InvalidRequestError, NoCapacityError, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence

pytestmark = pytest.mark.unit

BS = 2
NUM_BLOCKS = 8
EOS = 99
TOKENS = st.sampled_from([0, 1, 2] * 3 + [EOS])
PROMPTS = st.lists(st.integers(0, 2), min_size=1, max_size=12)  # a small alphabet: many hits
ADD = st.tuples(st.just("add"), PROMPTS, st.integers(1, 8), st.booleans())
STEP = st.tuples(st.just("step"), st.lists(TOKENS, min_size=1, max_size=4))
OPS = st.lists(st.one_of(
    ADD, ADD, STEP, STEP, STEP, STEP,  # mostly traffic and steps: preemptions, hits, evictions
    st.tuples(st.just("reserve"), PROMPTS, st.integers(1, 8)),
    st.tuples(st.just("commit"), st.integers(0, 7), TOKENS),
    st.tuples(st.just("abort"), st.integers(0, 7)),
    st.tuples(st.just("release"), st.integers(0, 7)),
), max_size=80)


def check_invariants(sched: Scheduler) -> None:
    pool, cache = sched.block_pool, sched.prefix_cache
    assert cache is not None
    seqs = list(sched.requests.values())
    ids = [s.request_id for s in sched.waiting] + [s.request_id for s in sched.running]
    ids += list(sched.reserved) + list(sched.held)
    assert sorted(ids) == sorted(sched.requests)  # every tracked sequence in exactly one state

    # Ref counts are the block-table references; free + used == total; the free list holds each
    # ref-0 block once.
    refs = Counter(b for s in seqs for b in s.block_table)
    assert pool.ref_cnt == [refs[b] for b in range(NUM_BLOCKS)]
    assert pool.num_free_blocks + pool.num_used_blocks == NUM_BLOCKS
    assert pool.num_used_blocks == len(refs)
    free = pool.free_block_ids()
    assert len(free) == len(set(free)) == pool.num_free_blocks
    assert set(free) == {b for b in range(NUM_BLOCKS) if pool.ref_cnt[b] == 0}

    # Cache membership: a sequence's cached blocks sit in the trie under its own tokens, each under
    # the block before it in its table (so a holder of a cached block holds its ancestors).
    parents = cache.parents()
    assert all(p is None or p in parents for p in parents.values())
    for s in sched.waiting:
        assert s.block_table == [] and s.num_computed_tokens == 0 and s.cache_node is None
    for s in seqs:
        assert len(s.block_table) >= -(-s.num_computed_tokens // BS)
        n = s.num_cached_blocks
        assert n <= s.num_computed_tokens // BS
        assert cache.match(s.token_ids[: n * BS]) == s.block_table[:n]
        for i, b in enumerate(s.block_table):
            if b in parents:
                assert parents[b] == (s.block_table[i - 1] if i else None)
                assert cache.match(s.token_ids[: (i + 1) * BS])[i] == b

    # The leaf invariant: a child in use keeps its parent in use; free, it is evicted first.
    position = {b: i for i, b in enumerate(free)}
    for b, p in parents.items():
        if p is None:
            continue
        if pool.ref_cnt[b] > 0:
            assert pool.ref_cnt[p] > 0
        elif pool.ref_cnt[p] == 0:
            assert position[b] < position[p]


def new_seq(request_id: str, prompt: list[int], max_tokens: int, prefill_only: bool) -> Sequence:
    return Sequence(
        request_id=request_id, token_ids=list(prompt), num_prompt_tokens=len(prompt),
        sampling=SamplingParams(temperature=0, max_tokens=max_tokens), seed=0,
        prefill_only=prefill_only,
    )


def pick(names, n):
    names = sorted(names)
    return names[n % len(names)] if names else None


# Three growing sequences sharing a prefix in 8 blocks: hits, preemptions, evictions, then a
# prefill_only request held and released, and a reservation committed over its cached blocks.
PREEMPTIONS = [("add", [0, 1, 0, 1, 0, 1], 8, False), ("add", [0, 1, 0, 1, 2, 2], 8, False),
               ("add", [2, 2, 2, 2, 2], 8, False)] + [("step", [0])] * 12
CACHED_ROLES = [("add", [1, 1, 1, 1, 2], 2, True), ("step", [1]), ("release", 0),
                ("reserve", [1, 1, 1, 1, 2, 0], 4), ("commit", 0, 2), ("step", [1]), ("abort", 0)]


@settings(max_examples=200, deadline=None)
@example(PREEMPTIONS)
@example(CACHED_ROLES + PREEMPTIONS)
@given(OPS)
def test_scheduler_keeps_blocks_and_cache_consistent_under_random_operations(ops):
    sched = Scheduler(
        BlockPool(NUM_BLOCKS, prefix_cache=RadixCache(BS)), block_size=BS, max_num_seqs=3,
        max_num_batched_tokens=6, max_model_len=24, eos_token_ids=frozenset([EOS]),
    )
    num_added = 0
    for op, *args in ops:
        if op == "add":
            prompt, max_tokens, prefill_only = args
            num_added += 1
            try:
                sched.add(new_seq(f"r{num_added}", prompt, max_tokens, prefill_only))
            except InvalidRequestError:
                pass
        elif op == "step":
            (tokens,) = args
            scheduled = sched.schedule()
            check_invariants(sched)  # blocks are taken before the pass
            sampled = [tokens[i % len(tokens)] if item.samples else None
                       for i, item in enumerate(scheduled)]
            sched.update(scheduled, sampled)
        elif op == "reserve":
            prompt, max_tokens = args
            num_added += 1
            free_before = sched.block_pool.num_free_blocks
            try:
                sched.reserve(new_seq(f"r{num_added}", prompt, max_tokens, False))
            except (NoCapacityError, InvalidRequestError):
                assert sched.block_pool.num_free_blocks == free_before  # nothing taken
        elif op == "commit":
            request_id = pick(sched.reserved, args[0])
            if request_id is not None:
                sched.commit(request_id, args[1])
        elif op == "abort":
            request_id = pick(sched.requests, args[0])
            if request_id is not None:
                assert sched.abort(request_id)
        elif op == "release":
            request_id = pick(sched.held, args[0])
            if request_id is not None:
                sched.release(request_id)
        check_invariants(sched)
    for request_id in list(sched.requests):
        sched.abort(request_id)
    check_invariants(sched)
    assert sched.block_pool.num_free_blocks == NUM_BLOCKS
