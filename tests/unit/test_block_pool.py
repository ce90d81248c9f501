"""BlockPool: exact block ids, free-list order, LRU eviction of cached-free blocks, two-step
admission, invariants."""

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool
from engine.radix_cache import RadixCache
from engine.request import NoCapacityError

pytestmark = pytest.mark.unit


class RecordingCache(RadixCache):
    """A prefix cache (one token per block) that records what the pool evicts from it."""

    def __init__(self) -> None:
        super().__init__(block_size=1)
        self.evicted: list[int] = []

    def evict(self, block_ids):
        block_ids = list(block_ids)
        super().evict(block_ids)
        self.evicted += block_ids


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
    cache = RecordingCache()
    evicted = cache.evicted
    pool = BlockPool(6, prefix_cache=cache)
    a = pool.allocate(3)  # [0, 1, 2]
    b = pool.allocate(2)  # [3, 4]
    cache.insert([10, 11, 12], a)
    cache.insert([20, 21], b)
    assert pool.is_cached(4) and not pool.is_cached(5)
    pool.free(reversed(a))  # 2, 1, 0 join the tail after 5
    pool.free(reversed(b))  # then 4, 3
    assert pool.free_block_ids() == [5, 2, 1, 0, 4, 3]
    assert pool.num_free_blocks == 6 and pool.num_used_blocks == 0
    assert pool.allocate(1) == [5] and evicted == []  # an empty block: nothing to evict
    assert pool.allocate(2) == [2, 1] and evicted == [2, 1]  # a's deepest blocks first
    assert not pool.is_cached(2) and pool.is_cached(0)


def test_acquire_takes_cached_free_blocks_out_of_the_middle_of_the_free_list():
    cache = RecordingCache()
    evicted = cache.evicted
    pool = BlockPool(5, prefix_cache=cache)
    table = pool.allocate(4)  # [0, 1, 2, 3]
    cache.insert([1, 2, 3], table[:3])
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


def test_acquire_refuses_a_free_block_that_is_not_cached():
    for pool in (BlockPool(3), BlockPool(3, prefix_cache=RecordingCache())):
        with pytest.raises(ValueError, match="free and not cached"):
            pool.acquire([1])
        assert pool.free_block_ids() == [0, 1, 2] and pool.ref_cnt == [0, 0, 0]


def test_the_cache_is_the_only_record_of_cached_blocks():
    cache = RecordingCache()
    pool = BlockPool(2, prefix_cache=cache)
    cache.insert([5, 6], pool.allocate(2))
    pool.free([1, 0])
    assert pool.is_cached(0) and pool.is_cached(1)
    cache.clear()  # forgetting every block needs no word to the pool
    assert not pool.is_cached(0) and not pool.is_cached(1)
    assert pool.allocate(2) == [1, 0] and cache.evicted == []


def test_double_free_and_bad_sizes_are_refused():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="already free"):
        pool.free([0])
    with pytest.raises(ValueError, match="num_blocks must be > 0"):
        BlockPool(0)


@settings(max_examples=100, deadline=None)
@example([("alloc", 3), ("alloc", 2), ("cache", 0), ("free", 0), ("hit", 0)])  # 2, 1 mid-list
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "share", "cache", "hit"]),
                          st.integers(0, 5)), max_size=40))
def test_free_plus_used_is_total_and_ref_counts_match_tables(ops):
    cache = RecordingCache()
    pool = BlockPool(10, prefix_cache=cache)
    tables: list[tuple[list[int], list[int]]] = []  # (block table, its tokens: one per block)
    cached_tokens: list[list[int]] = []  # token lists registered in the cache
    num_tables = 0
    for op, n in ops:
        if op == "alloc":
            if pool.can_allocate(n):
                num_tables += 1  # unique tokens per table: no two tables cache the same content
                tables.append((pool.allocate(n), [100 * num_tables + i for i in range(n)]))
        elif op == "free" and tables:
            pool.free(reversed(tables.pop(n % len(tables))[0]))
        elif op == "share" and tables:
            table, tokens = tables[n % len(tables)]
            pool.acquire(table[:n])
            tables.append((table[:n], tokens[:n]))
        elif op == "cache" and tables:
            table, tokens = tables[n % len(tables)]
            assert cache.insert(tokens, table).depth == len(table)
            cached_tokens.append(tokens)
        elif op == "hit" and cached_tokens:  # a prefix-cache hit, as the scheduler takes one
            tokens = cached_tokens[n % len(cached_tokens)]
            hit_ids = cache.match(tokens)
            free_before = pool.free_block_ids()
            num_free = pool.num_free_among(hit_ids)
            pool.acquire(hit_ids)
            assert pool.free_block_ids() == [b for b in free_before if b not in hit_ids]
            assert pool.num_free_blocks == len(free_before) - num_free
            tables.append((hit_ids, tokens[: len(hit_ids)]))
        used = [b for t, _ in tables for b in t]
        free = pool.free_block_ids()
        assert len(free) == len(set(free)) == pool.num_free_blocks
        assert pool.num_free_blocks + len(set(used)) == pool.num_total_blocks
        assert all(pool.ref_cnt[b] == used.count(b) for b in range(10))
        assert set(free) == {b for b in range(10) if pool.ref_cnt[b] == 0}
        assert all(pool.is_cached(b) == (b in cache.parents()) for b in range(10))
