"""The radix prefix cache over full KV blocks. Pure Python: no torch, no pool.

A trie with one edge per full block: the key of an edge is the block's block_size token ids, the
node it leads to holds the block id whose K/V are those tokens' (given every token before them),
and a chained content hash, `block_hash`, over the parent's hash and the block's token ids. The hash
is blake2b-64, stable across processes and machines (Python's hash() is salted per process), so a
router can compute the same chain for a prompt with `block_hashes()` and look it up in the index
it builds from this cache's events.

Operations:
    match(token_ids)             block ids of the longest cached full-block prefix; no side effects.
    insert(token_ids, block_ids) register the full blocks covered. Where a block of the same content
                                 is already cached under another id, the existing node stays and the
                                 caller's copy stays uncached -- and so do the caller's later blocks
                                 (see the leaf invariant below); returns how many leading blocks are
                                 cached under the caller's ids.
    evict(block_id)              the block pool's on_evict callback: forget a leaf.

Lock counts: a block's lock count is its ref_cnt in the block pool. A block with ref_cnt > 0 is on
no free list and so can never be evicted; a cached block with ref_cnt 0 ("cached-free") waits on
the pool's free list, least recently freed first, and is evicted when the pool hands it out.

The leaf invariant (why `evict` only ever sees a leaf): (1) every sequence holding a cached block
also holds all of its ancestors -- a hit acquires the whole matched chain, and `insert` registers a
block only under a path made of the caller's own blocks (it stops at the first block cached under
another id); (2) sequences free their block tables in reverse, so whenever a child's ref_cnt drops
to 0 its holder still holds the parent, whose ref_cnt drops to 0 later. A block re-enters the free
list at the tail on each such drop, so every child sits nearer the head than its parent and is
evicted first; and a child in use keeps its parent in use. `evict` asserts it.

Events (BlockStored, BlockRemoved, AllBlocksCleared) are buffered, oldest first, and drained with
`take_events()`; a consumer rebuilds the set of cached block hashes from them. The buffer is
bounded: events beyond max_pending_events drop the oldest and count in num_dropped_events, after
which a consumer must resynchronize.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockStored:
    """Consecutive blocks of one chain became cached; token_ids covers all of them in order."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None  # None: the first block starts at the root
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def hash_block(parent_block_hash: int | None, token_ids: Sequence[int]) -> int:
    """The chained hash of one block: blake2b-64 of the parent's hash and the token ids."""
    h = hashlib.blake2b(digest_size=8)
    if parent_block_hash is not None:
        h.update(parent_block_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of token_ids (a trailing partial block has none)."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # the block's token ids; () at the root
    block_id: int | None  # None only at the root
    block_hash: int | None  # None only at the root
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)


class RadixCache:
    def __init__(self, block_size: int, max_pending_events: int = 1 << 14) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if max_pending_events <= 0:
            raise ValueError(f"max_pending_events must be > 0, got {max_pending_events}")
        self.block_size = block_size
        self._root = _Node((), None, None, None)
        self._nodes: dict[int, _Node] = {}  # block id -> its node
        self._events: deque[KVEvent] = deque(maxlen=max_pending_events)
        self.num_dropped_events = 0

    @property
    def num_cached_blocks(self) -> int:
        return len(self._nodes)

    def __contains__(self, block_id: int) -> bool:
        return block_id in self._nodes

    def is_leaf(self, block_id: int) -> bool:
        return not self._nodes[block_id].children

    def block_hash(self, block_id: int) -> int:
        node = self._nodes.get(block_id)
        if node is None:
            raise KeyError(f"block {block_id} is not in the prefix cache")
        return node.block_hash  # type: ignore[return-value]  # None only at the root

    # ------------------------------------------------------------------ lookups and updates
    def match(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of token_ids' full blocks."""
        bs = self.block_size
        node = self._root
        block_ids: list[int] = []
        for start in range(0, len(token_ids) - bs + 1, bs):
            child = node.children.get(tuple(token_ids[start : start + bs]))
            if child is None:
                break
            block_ids.append(child.block_id)  # type: ignore[arg-type]
            node = child
        return block_ids

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> int:
        """Register the full blocks of token_ids held in block_ids (block i holds tokens
        [i * block_size, (i + 1) * block_size)). Returns the number of leading blocks now cached
        under the given ids: it stops at the first block cached under another id."""
        bs = self.block_size
        num_full = min(len(token_ids) // bs, len(block_ids))
        node = self._root
        new_nodes: list[_Node] = []
        num_cached = 0
        for i in range(num_full):
            key = tuple(token_ids[i * bs : (i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                block_id = block_ids[i]
                if block_id in self._nodes:
                    raise ValueError(f"block {block_id} is already cached for other tokens")
                child = _Node(key, block_id, hash_block(node.block_hash, key), node)
                node.children[key] = child
                self._nodes[block_id] = child
                new_nodes.append(child)
            elif child.block_id != block_ids[i]:
                break  # a copy: the cached block stays, the caller's blocks from here stay uncached
            node = child
            num_cached = i + 1
        if new_nodes:
            parent = new_nodes[0].parent
            self._record(BlockStored(
                block_hashes=tuple(n.block_hash for n in new_nodes),  # type: ignore[misc]
                parent_block_hash=parent.block_hash if parent is not None else None,
                token_ids=tuple(t for n in new_nodes for t in n.key),
                block_size=bs,
            ))
        return num_cached

    def evict(self, block_id: int) -> None:
        """Forget a cached block (the pool is handing it out); it must be a leaf."""
        node = self._nodes.pop(block_id, None)
        if node is None:
            raise KeyError(f"block {block_id} is not in the prefix cache")
        assert not node.children, (
            f"block {block_id} is evicted before its {len(node.children)} cached children: "
            "a block table was not freed in reverse"
        )
        assert node.parent is not None
        del node.parent.children[node.key]
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):  # coalesce the evictions of one allocation
            self._events[-1] = BlockRemoved(last.block_hashes + (node.block_hash,))  # type: ignore[operator]
        else:
            self._record(BlockRemoved((node.block_hash,)))  # type: ignore[arg-type]

    def clear(self) -> None:
        """Forget every block (the caller makes sure none is in use, and tells the pool)."""
        self._root.children.clear()
        self._nodes.clear()
        self._record(AllBlocksCleared())

    # ------------------------------------------------------------------ events
    def take_events(self) -> list[KVEvent]:
        events = list(self._events)
        self._events.clear()
        return events

    def _record(self, event: KVEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.num_dropped_events += 1
        self._events.append(event)
