"""BlockPool: exact block ids, free-list order, LRU eviction of cached-free blocks, two-step
admission, invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool
from engine.request import NoCapacityError

pytestmark = pytest.mark.unit


def test_allocates_from_the_head_in_order():
    pool = BlockPool(8)
    assert pool.free_block_ids() == list(range(8))
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.free_block_ids() == [5, 6, 7]
    assert pool.num_free_blocks == 3
    assert pool.num_used_blocks == 5
    assert pool.usage == 5 / 8


def test_freed_blocks_go_to_the_tail_in_the_order_given():
    pool = BlockPool(6)
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    pool.free(reversed(a))
    # 4, 5 were free before 1, 0 came back
    assert pool.free_block_ids() == [4, 5, 1, 0]
    assert pool.allocate(4) == [4, 5, 1, 0]
    pool.free(b)
    pool.free([5, 4])
    assert pool.allocate(4) == [2, 3, 5, 4]


def test_can_allocate_then_allocate_is_all_or_nothing():
    pool = BlockPool(4)
    assert pool.can_allocate(4)
    assert not pool.can_allocate(5)
    pool.allocate(3)
    assert pool.can_allocate(1) and not pool.can_allocate(2)
    with pytest.raises(NoCapacityError, match="need 2 KV blocks, only 1 of 4"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1  # nothing was taken by the failed call
    assert pool.allocate(0) == []
    with pytest.raises(ValueError, match="num_blocks must be >= 0"):
        pool.allocate(-1)


def test_ref_counts_keep_shared_blocks_used():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.acquire([blocks[0]])
    pool.free(blocks)
    assert pool.ref_cnt == [1, 0, 0]
    assert pool.num_free_blocks == 2
    pool.free([blocks[0]])
    assert pool.num_free_blocks == 3
    assert pool.allocate(3) == [2, 1, 0]


def test_cached_free_blocks_are_evicted_least_recently_freed_first():
    evicted = []
    pool = BlockPool(6, on_evict=evicted.append)
    a = pool.allocate(3)  # [0, 1, 2]
    b = pool.allocate(2)  # [3, 4]
    pool.mark_cached(a + b)
    pool.free(reversed(a))  # 2, 1, 0 join the tail after 5
    pool.free(reversed(b))  # then 4, 3
    assert pool.free_block_ids() == [5, 2, 1, 0, 4, 3]
    assert pool.num_free_blocks == 6 and pool.num_used_blocks == 0
    assert pool.allocate(1) == [5] and evicted == []  # an empty block: nothing to evict
    assert pool.allocate(2) == [2, 1] and evicted == [2, 1]  # a's deepest blocks first
    assert not pool.is_cached(2) and pool.is_cached(0)


def test_acquire_takes_cached_free_blocks_out_of_the_middle_of_the_free_list():
    evicted = []
    pool = BlockPool(5, on_evict=evicted.append)
    table = pool.allocate(4)  # [0, 1, 2, 3]
    pool.mark_cached(table[:3])
    pool.free(reversed(table))
    assert pool.free_block_ids() == [4, 3, 2, 1, 0]
    assert pool.num_free_among([0, 1]) == 2
    pool.acquire([0, 1])  # a prefix hit on the two first blocks
    assert pool.free_block_ids() == [4, 3, 2]
    assert pool.ref_cnt == [1, 1, 0, 0, 0] and pool.num_free_blocks == 3
    pool.acquire([0])  # a second sequence shares block 0
    assert pool.ref_cnt[0] == 2 and pool.num_free_among([0, 1, 2]) == 1
    assert pool.allocate(3) == [4, 3, 2] and evicted == [2]  # 3 was never cached
    pool.free([1, 0])
    assert pool.free_block_ids() == [1]  # block 0 is still held once
    pool.free([0])
    assert pool.free_block_ids() == [1, 0]


def test_acquire_and_mark_cached_refuse_what_they_cannot_do():
    pool = BlockPool(3)
    with pytest.raises(ValueError, match="free and not cached"):
        pool.acquire([1])
    with pytest.raises(ValueError, match="only a used block can be cached"):
        pool.mark_cached([1])
    assert pool.free_block_ids() == [0, 1, 2] and pool.ref_cnt == [0, 0, 0]


def test_uncache_all_keeps_the_order_and_stops_evictions():
    evicted = []
    pool = BlockPool(2, on_evict=evicted.append)
    pool.mark_cached(pool.allocate(2))
    pool.free([1, 0])
    pool.uncache_all()
    assert pool.allocate(2) == [1, 0] and evicted == []


def test_double_free_and_bad_sizes_are_refused():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="already free"):
        pool.free([0])
    with pytest.raises(ValueError, match="num_blocks must be > 0"):
        BlockPool(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "cache"]),
                          st.integers(0, 5)), max_size=40))
def test_free_plus_used_is_total_and_ref_counts_match_tables(ops):
    pool = BlockPool(10, on_evict=lambda block_id: None)
    tables: list[list[int]] = []
    for op, n in ops:
        if op == "alloc":
            if pool.can_allocate(n):
                tables.append(pool.allocate(n))
        elif op == "free" and tables:
            pool.free(reversed(tables.pop(n % len(tables))))
        elif op == "share" and tables:
            shared = tables[n % len(tables)][: n]
            pool.acquire(shared)
            tables.append(list(shared))
        elif op == "cache" and tables:
            pool.mark_cached(tables[n % len(tables)])
        used = [b for t in tables for b in t]
        free = pool.free_block_ids()
        assert len(free) == len(set(free)) == pool.num_free_blocks
        assert pool.num_free_blocks + len(set(used)) == pool.num_total_blocks
        assert all(pool.ref_cnt[b] == used.count(b) for b in range(10))
        assert set(free) == {b for b in range(10) if pool.ref_cnt[b] == 0}
