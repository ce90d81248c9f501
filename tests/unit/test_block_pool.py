"""BlockPool: exact block ids, free-list order, two-step admission, invariants."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool
from engine.request import NoCapacityError

pytestmark = pytest.mark.unit


def test_allocates_from_the_head_in_order():
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.num_free_blocks == 3
    assert pool.num_used_blocks == 5
    assert pool.usage == 5 / 8


def test_freed_blocks_go_to_the_tail():
    pool = BlockPool(6)
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    pool.free(a)
    # 4, 5 were free before 0, 1 came back
    assert pool.allocate(4) == [4, 5, 0, 1]
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


def test_ref_counts_keep_shared_blocks_used():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.incref([blocks[0]])
    pool.free(blocks)
    assert pool.ref_cnt == [1, 0, 0]
    assert pool.num_free_blocks == 2
    pool.free([blocks[0]])
    assert pool.num_free_blocks == 3
    assert pool.allocate(3) == [2, 1, 0]


def test_double_free_and_bad_sizes_are_refused():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="already free"):
        pool.free([0])
    with pytest.raises(ValueError, match="is free"):
        pool.incref([1])
    with pytest.raises(ValueError):
        BlockPool(0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=40))
def test_free_plus_used_is_total_and_ref_counts_match_tables(ops):
    pool = BlockPool(10)
    tables: list[list[int]] = []
    for is_alloc, n in ops:
        if is_alloc:
            if pool.can_allocate(n):
                tables.append(pool.allocate(n))
        elif tables:
            pool.free(tables.pop(n % len(tables)))
        used = [b for t in tables for b in t]
        assert len(used) == len(set(used))
        assert pool.num_free_blocks + len(used) == pool.num_total_blocks
        assert all(pool.ref_cnt[b] == (1 if b in used else 0) for b in range(10))
