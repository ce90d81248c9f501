"""router.prefix_index: per-worker prefix lengths from block-hash events, and the stream entry
codec of router/kv_events.py that feeds it."""

from __future__ import annotations

import pytest

from engine.radix_cache import AllBlocksCleared, BlockRemoved, BlockStored, RadixCache, block_hashes
from router.kv_events import apply_entry, event_entries, snapshot_entry
from router.prefix_index import PrefixIndex

pytestmark = pytest.mark.unit

BS = 4
PROMPT = list(range(100, 118))  # 18 tokens: 4 full blocks and 2 more
H = block_hashes(PROMPT, BS)


def test_match_walks_the_chain_per_worker() -> None:
    index = PrefixIndex()
    index.stored("a", H[:3], BS)
    index.stored("b", H[:1], BS)
    index.stored("c", H[1:4], BS)  # not from the first block: no prefix
    assert index.match(PROMPT) == {"a": 12, "b": 4, "c": 0}
    assert index.match(PROMPT, ["a", "z"]) == {"a": 12}  # unknown workers are left out
    assert index.match(PROMPT[:7]) == {"a": 4, "b": 4, "c": 0}  # only full blocks count
    assert index.match([1, 2, 3, 4]) == {"a": 0, "b": 0, "c": 0}


def test_removed_cuts_the_prefix_and_forget_drops_the_worker() -> None:
    index = PrefixIndex()
    index.stored("a", H, BS)
    index.stored("b", H, BS)
    index.removed("a", [H[2]])
    assert index.match(PROMPT) == {"a": 8, "b": 16}
    index.forget("b")
    assert index.match(PROMPT) == {"a": 8}
    assert len(index) == 3  # H[0], H[1], H[3]: held by a only
    index.removed("a", H)
    index.removed("nobody", H)  # no error
    assert len(index) == 0 and index.match(PROMPT) == {"a": 0}


def test_replace_is_a_snapshot_and_retain_keeps_only_live_workers() -> None:
    index = PrefixIndex()
    index.stored("a", H, BS)
    index.replace("a", H[:1], BS)
    assert index.match(PROMPT) == {"a": 4}
    index.stored("b", H, BS)
    index.retain(["b"])
    assert index.workers() == ["b"] and index.num_blocks("b") == 4


def test_other_block_sizes_hash_their_own_chain() -> None:
    index = PrefixIndex()
    index.stored("a", H[:2], BS)
    index.stored("big", block_hashes(PROMPT, 8)[:2], 8)
    assert index.match(PROMPT) == {"a": 8, "big": 16}
    index.stored("a", block_hashes(PROMPT, 8)[:1], 8)  # a new block size: a new cache
    assert index.match(PROMPT)["a"] == 8
    with pytest.raises(ValueError, match="block_size must be > 0"):
        index.stored("a", [], 0)


def test_events_from_a_real_radix_cache_round_trip_through_stream_entries() -> None:
    cache = RadixCache(BS, enable_events=True)
    cache.insert(PROMPT, [10, 11, 12, 13])
    cache.insert(PROMPT[:8] + [7, 7, 7, 7], [10, 11, 20])
    cache.evict([13])
    index = PrefixIndex()
    for entry in event_entries(cache.take_events(), BS):
        apply_entry(index, "w", {k.encode(): v for k, v in entry.items()})
    assert index.match(PROMPT) == {"w": 12}
    assert index.match(PROMPT[:8] + [7, 7, 7, 7]) == {"w": 12}
    # a snapshot replaces; AllBlocksCleared becomes an empty one
    apply_entry(index, "w", {k.encode(): v for k, v in snapshot_entry(H[:1], BS).items()})
    assert index.match(PROMPT) == {"w": 4}
    (cleared,) = event_entries([AllBlocksCleared()], BS)
    apply_entry(index, "w", {k.encode(): v for k, v in cleared.items()})
    assert index.match(PROMPT) == {"w": 0}
    batch = cache.take_event_batch(snapshot=True)
    assert sorted(batch.snapshot) == sorted(block_hashes(PROMPT, BS)[:3] + [
        block_hashes(PROMPT[:8] + [7, 7, 7, 7], BS)[2]])


@pytest.mark.parametrize("fields, message", [
    ({b"k": b"moved", b"h": b""}, "unknown entry kind"),
    ({b"k": b"stored", b"h": b"1234567"}, "multiple of 8"),
    ({b"k": b"stored", b"h": b""}, "without a valid block size"),
    ({b"k": b"snapshot", b"h": b"", b"bs": b"x"}, "without a valid block size"),
])
def test_malformed_entries_are_refused(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        apply_entry(PrefixIndex(), "w", fields)


def test_entries_name_removed_and_stored_blocks() -> None:
    stored, removed = event_entries(
        [BlockStored(tuple(H[:2]), None, tuple(PROMPT[:8]), BS), BlockRemoved((H[1],))], BS)
    assert stored["k"] == b"stored" and stored["bs"] == b"4" and len(stored["h"]) == 16
    assert removed == {"k": b"removed", "h": H[1].to_bytes(8, "little")}
