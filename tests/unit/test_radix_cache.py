"""RadixCache alone and with a BlockPool: exact block ids, eviction order, chained hashes, events,
and a property test driving pool + cache + block tables through random admissions and frees."""

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool
from engine.radix_cache import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    RadixCache,
    block_hashes,
    hash_block,
)

pytestmark = pytest.mark.unit


def test_chained_hashes_are_blake2b_over_the_parent_hash_and_the_tokens():
    h0 = hashlib.blake2b(struct.pack("<2I", 1, 2), digest_size=8).digest()
    h1 = hashlib.blake2b(h0 + struct.pack("<2I", 3, 4), digest_size=8).digest()
    expected = [int.from_bytes(h0, "little"), int.from_bytes(h1, "little")]
    assert block_hashes([1, 2, 3, 4, 5], 2) == expected  # the partial block has no hash
    assert expected == [16575463538019919403, 4846721673529240091]  # the same in every process
    assert hash_block(expected[0], [3, 4]) == expected[1]
    assert block_hashes([3, 4], 2) != [expected[1]]  # the chain, not the block alone
    assert block_hashes([1], 2) == []


def test_match_returns_the_longest_cached_full_block_prefix():
    cache = RadixCache(block_size=2)
    assert cache.insert([1, 2, 3, 4, 5], [7, 8, 9]).depth == 2  # the partial third block is not
    assert cache.num_cached_blocks == 2 and 9 not in cache
    assert cache.match([1, 2, 3, 4, 5]) == [7, 8]
    assert cache.match([1, 2, 3, 4]) == [7, 8]
    assert cache.match([1, 2, 3]) == [7]
    assert cache.match([1, 2, 3, 9]) == [7]
    assert cache.match([2, 2, 3, 4]) == []
    assert cache.match([1]) == []
    assert cache.insert([1, 2, 6, 6], [7, 5]).depth == 2  # a branch under block 7
    assert cache.match([1, 2, 6, 6, 1]) == [7, 5]
    assert not cache.is_leaf(7) and cache.is_leaf(5) and cache.is_leaf(8)


def test_a_block_cached_under_another_id_keeps_the_existing_node():
    cache = RadixCache(block_size=2, enable_events=True)
    cache.insert([1, 2, 3, 4], [7, 8])
    cache.take_events()
    # A copy of block 7 (computed concurrently as 10): neither it nor what follows is registered,
    # since block 7 could otherwise be evicted while a cached child of it is in use.
    assert cache.insert([1, 2, 3, 4, 5, 6], [10, 11, 12]).depth == 0
    assert 10 not in cache and 12 not in cache and cache.take_events() == []
    assert cache.insert([1, 2, 3, 4, 5, 6], [7, 8, 12]).depth == 3
    assert cache.match([1, 2, 3, 4, 5, 6]) == [7, 8, 12]
    [stored] = cache.take_events()
    assert stored == BlockStored(
        block_hashes=(block_hashes([1, 2, 3, 4, 5, 6], 2)[2],),
        parent_block_hash=cache.block_hash(8), token_ids=(5, 6), block_size=2,
    )
    with pytest.raises(ValueError, match="already cached"):
        cache.insert([9, 9], [12])


def test_events_name_the_chained_hashes_and_one_eviction_call_is_one_event():
    cache = RadixCache(block_size=2, enable_events=True)
    cache.insert([1, 2, 3, 4, 5], [0, 1, 2])
    cache.insert([1, 2, 3, 4, 6, 6], [0, 1, 3])
    h = block_hashes([1, 2, 3, 4], 2)
    h_66 = hash_block(h[1], [6, 6])
    assert cache.take_events() == [
        BlockStored(tuple(h), None, (1, 2, 3, 4), 2),
        BlockStored((h_66,), h[1], (6, 6), 2),
    ]
    assert cache.take_events() == []
    cache.evict([3, 1])  # one allocation's evictions, deepest first
    cache.insert([5, 5], [4])
    cache.evict([4])
    cache.evict([0])  # the next allocation: an event of its own
    cache.evict([])
    assert cache.take_events() == [
        BlockRemoved((h_66, h[1])),
        BlockStored((hash_block(None, [5, 5]),), None, (5, 5), 2),
        BlockRemoved((hash_block(None, [5, 5]),)),
        BlockRemoved((h[0],)),
    ]
    cache.clear()
    assert cache.take_events() == [AllBlocksCleared()]
    assert cache.num_cached_blocks == 0 and cache.match([1, 2]) == []


def test_events_are_recorded_only_when_enabled():
    cache = RadixCache(block_size=1)
    cache.insert([1, 2], [0, 1])
    cache.evict([1])
    cache.clear()
    assert cache.take_events() == [] and cache.num_dropped_events == 0


def test_the_event_buffer_is_bounded_and_counts_what_it_drops():
    cache = RadixCache(block_size=1, enable_events=True, max_pending_events=2)
    for token in range(3):
        cache.insert([token], [token])
    assert [e.token_ids for e in cache.take_events()] == [(1,), (2,)]
    assert cache.num_dropped_events == 1


def test_evict_refuses_an_inner_node_and_an_unknown_block_with_runtime_errors():
    cache = RadixCache(block_size=2)
    cache.insert([1, 2, 3, 4], [0, 1])
    with pytest.raises(RuntimeError, match="before its 1 cached children"):
        cache.evict([0])
    assert cache.match([1, 2, 3, 4]) == [0, 1]  # refused before anything changed
    with pytest.raises(KeyError):
        cache.evict([5])
    with pytest.raises(ValueError):
        RadixCache(block_size=0)


def test_insert_continues_from_the_callers_last_node():
    cache = RadixCache(block_size=2, enable_events=True)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8]
    node = cache.insert(tokens, [0])
    assert (node.depth, node.block_id) == (1, 0)
    node = cache.insert(tokens, [0, 1, 2], node)  # only blocks 1 and 2 are walked
    assert (node.depth, node.block_id) == (3, 2)
    assert cache.insert(tokens, [0, 1, 2], node) is node  # nothing new
    assert cache.match(tokens) == [0, 1, 2]
    assert [e.token_ids for e in cache.take_events()] == [(1, 2), (3, 4, 5, 6)]
    # The rule holds from a node too: a block cached under another id stops the insert.
    other = cache.insert([1, 2, 3, 4, 9, 9], [0, 1, 5])
    assert other.depth == 3
    copy = cache.insert([1, 2, 3, 4, 9, 9, 4, 4], [0, 1, 6, 7], cache.insert([1, 2, 3, 4], [0, 1]))
    assert copy.block_id == 1 and 6 not in cache and 7 not in cache
    cache.evict([2])
    with pytest.raises(RuntimeError, match="no longer cached"):
        cache.insert(tokens + [9, 9], [0, 1, 2, 3], node)


def test_lookup_resumes_until_a_block_is_removed():
    cache = RadixCache(block_size=2)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    cache.insert([1, 2], [0])
    first = cache.lookup(tokens)
    assert first.block_ids == [0] and first.node.depth == 1
    cache.insert([1, 2, 3, 4], [0, 1])  # an addition: the match resumes and grows
    second = cache.lookup(tokens, first)
    assert second.block_ids == [0, 1] and second.node.block_id == 1
    assert cache.lookup(tokens, second, num_tokens=5).block_ids == [0, 1]  # other tokens: afresh
    cache.insert([8, 8], [2])
    cache.evict([2])  # any removal makes a kept match stale: its ids may be handed out
    stale = second.node
    cache.evict([1])
    third = cache.lookup(tokens, second)
    assert third.block_ids == [0] and third.node is not stale
    cache.clear()
    assert cache.lookup(tokens, third).block_ids == []


def cached_pool(num_blocks, block_size):
    cache = RadixCache(block_size, enable_events=True)
    return BlockPool(num_blocks, prefix_cache=cache), cache


def admit(pool, cache, token_ids):
    """What the scheduler does: take the hits, allocate the rest (all tokens computed), register."""
    hits = cache.match(token_ids)
    pool.acquire(hits)
    table = hits + pool.allocate(-(-len(token_ids) // cache.block_size) - len(hits))
    cache.insert(token_ids, table)
    return table


def test_lru_eviction_with_shared_prefixes_through_the_pool():
    pool, cache = cached_pool(8, block_size=2)
    a = admit(pool, cache, [1, 2, 3, 4, 5, 6])  # [0, 1, 2]
    b = admit(pool, cache, [1, 2, 3, 4, 7, 7, 8])  # hits [0, 1], then [3, 4]
    assert (a, b) == ([0, 1, 2], [0, 1, 3, 4])
    assert pool.ref_cnt[:5] == [2, 2, 1, 1, 1] and 4 not in cache  # b's last block is partial
    pool.free(reversed(a))  # only 2 reaches 0
    pool.free(reversed(b))  # then 4 (never cached), 3, 1, 0
    assert pool.free_block_ids() == [5, 6, 7, 2, 4, 3, 1, 0]
    cache.take_events()
    # A hit on the shared prefix takes 0 and 1 out of the middle of the free list.
    c = admit(pool, cache, [1, 2, 3, 4, 9])
    assert c == [0, 1, 5] and pool.free_block_ids() == [6, 7, 2, 4, 3]
    assert pool.allocate(4) == [6, 7, 2, 4]  # evicts 2, the least recently freed cached block
    assert cache.match([1, 2, 3, 4, 5, 6]) == [0, 1] and 3 in cache
    assert cache.take_events() == [BlockRemoved((block_hashes([1, 2, 3, 4, 5, 6], 2)[2],))]
    pool.free(reversed(c))
    assert pool.free_block_ids() == [3, 5, 1, 0]
    assert pool.allocate(4) == [3, 5, 1, 0]  # 3 (a leaf) goes before its parent 1, then 0
    assert cache.num_cached_blocks == 0 and pool.num_free_blocks == 0


# ---------------------------------------------------------------------------------- property test

BS = 2
NUM_BLOCKS = 12
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=9)  # a small alphabet: many collisions


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "compute", "free", "match"]),
                          st.integers(0, 7), prompts), max_size=40))
def test_pool_and_cache_invariants_under_random_admissions_and_frees(ops):
    expected: dict[tuple[int, ...], int] = {}  # every cached full-block prefix -> its block id

    class TrackingCache(RadixCache):
        def evict(self, block_ids):
            block_ids = list(block_ids)
            super().evict(block_ids)
            for block_id in block_ids:
                [path] = [p for p, b in expected.items() if b == block_id]
                del expected[path]

    cache = TrackingCache(BS)
    pool = BlockPool(NUM_BLOCKS, prefix_cache=cache)
    seqs: list[dict] = []  # token_ids, block_table, num_cached_blocks, computed
    for op, n, token_ids in ops:
        if op == "admit":  # take the hits and allocate the rest, but register nothing yet
            hits = cache.match(token_ids[:-1])
            needed = -(-len(token_ids) // BS) - len(hits)
            if pool.can_allocate(needed + pool.num_free_among(hits)):
                pool.acquire(hits)
                table = hits + pool.allocate(needed)
                seqs.append({"tokens": token_ids, "table": table, "num_cached": len(hits)})
        elif op == "compute" and seqs:  # the sequence's K/V is computed: register its full blocks
            s = seqs[n % len(seqs)]
            num_cached = cache.insert(s["tokens"], s["table"]).depth
            assert num_cached >= s["num_cached"]
            s["num_cached"] = num_cached
            for i in range(num_cached):
                path = tuple(s["tokens"][: (i + 1) * BS])
                assert expected.setdefault(path, s["table"][i]) == s["table"][i]
        elif op == "free" and seqs:
            pool.free(reversed(seqs.pop(n % len(seqs))["table"]))
        elif op == "match":
            got = cache.match(token_ids)
            want = []
            for i in range(len(token_ids) // BS):
                block_id = expected.get(tuple(token_ids[: (i + 1) * BS]))
                if block_id is None:
                    break
                want.append(block_id)
            assert got == want

        refs = [b for s in seqs for b in s["table"]]
        free = pool.free_block_ids()
        assert pool.num_free_blocks + pool.num_used_blocks == NUM_BLOCKS
        assert pool.num_used_blocks == len(set(refs))
        assert all(pool.ref_cnt[b] == refs.count(b) for b in range(NUM_BLOCKS))
        assert len(free) == len(set(free)) and set(free) == {
            b for b in range(NUM_BLOCKS) if pool.ref_cnt[b] == 0
        }
        assert sorted(expected.values()) == sorted(b for b in range(NUM_BLOCKS) if b in cache)
        cached_free = [b for b in free if pool.is_cached(b)]
        if cached_free:
            assert cache.is_leaf(cached_free[0])  # the next cached block to be evicted
        for s in seqs:  # a sequence's registered blocks are still cached under its ids
            assert cache.match(s["tokens"])[: s["num_cached"]] == s["table"][: s["num_cached"]]
