"""The radix prefix cache over full KV blocks. Pure Python: no torch, no pool.

A trie with one edge per full block: the key of an edge is the block's block_size token ids, the
node it leads to holds the block id whose K/V are those tokens' (given every token before them),
and a chained content hash, `block_hash`, over the parent's hash and the block's token ids. The hash
is blake2b-64, stable across processes and machines (Python's hash() is salted per process), so a
router can compute the same chain for a prompt with `block_hashes()` and look it up in the index
it builds from this cache's events.

The cache is the only record of which blocks are cached: the block pool (engine/block_pool.py) is
built around one and asks it (`block_id in cache`) whether a free block is cached-free, and calls
`evict` when it hands such a block out. Build the pair with `BlockPool(n, prefix_cache=cache)`.

Operations:
    match(token_ids)             block ids of the longest cached full-block prefix; no side effects.
    lookup(token_ids, previous)  the same as a resumable PrefixMatch: while no block has been removed
                                 since `previous` was made, the walk continues from its last node.
    insert(token_ids, block_ids, parent)
                                 register the full blocks covered, from `parent` (a node an earlier
                                 insert or lookup returned for the same tokens) down. Where a block
                                 of the same content is already cached under another id, the
                                 existing node stays and the caller's copy stays uncached -- and so
                                 do the caller's later blocks (see the leaf invariant below); returns
                                 the deepest node cached under the caller's ids.
    evict(block_ids)             the block pool's call when an allocation hands cached-free blocks
                                 out: forget them, each a leaf when its turn comes.

Nodes are handles a caller may keep (a sequence keeps its deepest registered node) only while it
holds the node's block: a held block is never evicted, and `clear` is only called with no block in
use. A PrefixMatch kept across steps carries `epoch`, the number of removals when it was made; a
removal invalidates it (its block ids may have been handed out), additions do not.

Lock counts: a block's lock count is its ref_cnt in the block pool. A block with ref_cnt > 0 is on
no free list and so can never be evicted; a cached block with ref_cnt 0 ("cached-free") waits on
the pool's free list, least recently freed first, and is evicted when the pool hands it out.

The leaf invariant (why `evict` only ever sees a leaf): (1) every sequence holding a cached block
also holds all of its ancestors -- a hit acquires the whole matched chain, and `insert` registers a
block only under a path made of the caller's own blocks (it stops at the first block cached under
another id); (2) sequences free their block tables in reverse, so whenever a child's ref_cnt drops
to 0 its holder still holds the parent, whose ref_cnt drops to 0 later. A block re-enters the free
list at the tail on each such drop, so every child sits nearer the head than its parent and is
evicted first; and a child in use keeps its parent in use. `evict` checks it and raises
RuntimeError, touching nothing, when it does not hold.

Events (BlockStored, BlockRemoved, AllBlocksCleared) are recorded only when enable_events is set,
for a consumer that calls `take_events()` regularly (a router's index of cached blocks); nothing is
recorded otherwise. The buffer is bounded: events beyond max_pending_events drop the oldest and
count in num_dropped_events, after which a consumer must resynchronize. One BlockRemoved names the
blocks one allocation evicted.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Iterable, Sequence
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


@dataclass(frozen=True)
class KVEventBatch:
    """One drain of the events, taken in one go on the engine's thread (so consistent)."""

    events: list[KVEvent]
    num_dropped: int  # the cache's running count of events dropped before they were drained
    snapshot: list[int] | None  # every cached block's hash after the events, when asked for
    block_size: int


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
class RadixNode:
    """One cached block (or the root). Callers keep nodes only as handles for `insert`/`lookup`."""

    key: tuple[int, ...]  # the block's token ids; () at the root
    block_id: int | None  # None only at the root
    block_hash: int | None  # None only at the root
    parent: RadixNode | None
    depth: int  # blocks from the root to here, this one included; 0 at the root
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)


@dataclass
class PrefixMatch:
    """A lookup's result: block_ids of the longest cached prefix, resumable (see `lookup`)."""

    block_ids: list[int]
    node: RadixNode  # the last matched node; the root when nothing matched
    num_tokens: int  # how many tokens were looked up
    epoch: int  # the cache's number of removals when it was made


class RadixCache:
    def __init__(
        self, block_size: int, *, enable_events: bool = False, max_pending_events: int = 1 << 14
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if max_pending_events <= 0:
            raise ValueError(f"max_pending_events must be > 0, got {max_pending_events}")
        self.block_size = block_size
        self.enable_events = enable_events
        self._root = RadixNode((), None, None, None, 0)
        self._nodes: dict[int, RadixNode] = {}  # block id -> its node
        self._epoch = 0  # removals so far (evicted blocks and clears): invalidates PrefixMatches
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

    def cached_block_hashes(self) -> list[int]:
        """Every cached block's chained hash (a snapshot for a consumer that must resynchronize)."""
        return [node.block_hash for node in self._nodes.values()]  # type: ignore[misc]

    def parents(self) -> dict[int, int | None]:
        """Each cached block's parent block (None under the root). O(n): for tests and debugging."""
        return {b: node.parent.block_id for b, node in self._nodes.items()}  # type: ignore[union-attr]

    # ------------------------------------------------------------------ lookups and updates
    def match(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached prefix of token_ids' full blocks."""
        return self.lookup(token_ids).block_ids

    def lookup(
        self,
        token_ids: Sequence[int],
        previous: PrefixMatch | None = None,
        num_tokens: int | None = None,
    ) -> PrefixMatch:
        """match() of the first num_tokens of token_ids (all by default) as a PrefixMatch. With
        `previous` (an earlier lookup of the same tokens, no block removed since) the walk resumes
        from its last node: O(1) when nothing new is cached. A stale `previous` is ignored; a
        fresh one has its block_ids extended in place."""
        bs = self.block_size
        num_tokens = len(token_ids) if num_tokens is None else min(num_tokens, len(token_ids))
        if (
            previous is not None and previous.epoch == self._epoch
            and previous.num_tokens == num_tokens
        ):
            node, block_ids = previous.node, previous.block_ids
        else:
            node, block_ids = self._root, []
        for start in range(node.depth * bs, num_tokens - bs + 1, bs):
            child = node.children.get(tuple(token_ids[start : start + bs]))
            if child is None:
                break
            block_ids.append(child.block_id)  # type: ignore[arg-type]
            node = child
        return PrefixMatch(block_ids, node, num_tokens, self._epoch)

    def insert(
        self, token_ids: Sequence[int], block_ids: Sequence[int], parent: RadixNode | None = None
    ) -> RadixNode:
        """Register the full blocks of token_ids held in block_ids (block i holds tokens
        [i * block_size, (i + 1) * block_size)), from below `parent` (the caller's deepest
        registered node for these tokens; None: the root). Returns the deepest node cached under
        the given ids (`depth` counts them): it stops at the first block cached under another id."""
        bs = self.block_size
        num_full = min(len(token_ids) // bs, len(block_ids))
        node = self._root if parent is None else parent
        if node is not self._root and self._nodes.get(node.block_id) is not node:  # type: ignore[arg-type]
            raise RuntimeError(
                f"insert from block {node.block_id}, which is no longer cached: a node was kept "
                "after its block was freed"
            )
        new_nodes: list[RadixNode] = []
        for i in range(node.depth, num_full):
            key = tuple(token_ids[i * bs : (i + 1) * bs])
            child = node.children.get(key)
            if child is None:
                block_id = block_ids[i]
                if block_id in self._nodes:
                    raise ValueError(f"block {block_id} is already cached for other tokens")
                child = RadixNode(key, block_id, hash_block(node.block_hash, key), node, i + 1)
                node.children[key] = child
                self._nodes[block_id] = child
                new_nodes.append(child)
            elif child.block_id != block_ids[i]:
                break  # a copy: the cached block stays, the caller's blocks from here stay uncached
            node = child
        if new_nodes and self.enable_events:
            first_parent = new_nodes[0].parent
            self._record(BlockStored(
                block_hashes=tuple(n.block_hash for n in new_nodes),  # type: ignore[misc]
                parent_block_hash=first_parent.block_hash if first_parent is not None else None,
                token_ids=tuple(t for n in new_nodes for t in n.key),
                block_size=bs,
            ))
        return node

    def evict(self, block_ids: Iterable[int]) -> None:
        """Forget cached blocks the pool is handing out, in order; each must be a leaf by then.
        Records one BlockRemoved for all of them."""
        removed_hashes: list[int] = []
        for block_id in block_ids:
            node = self._nodes.get(block_id)
            if node is None:
                raise KeyError(f"block {block_id} is not in the prefix cache")
            if node.children:
                raise RuntimeError(
                    f"block {block_id} is evicted before its {len(node.children)} cached "
                    "children: a block table was not freed in reverse"
                )
            del self._nodes[block_id]
            del node.parent.children[node.key]  # type: ignore[union-attr]  # never the root
            self._epoch += 1
            removed_hashes.append(node.block_hash)  # type: ignore[arg-type]
        if removed_hashes and self.enable_events:
            self._record(BlockRemoved(tuple(removed_hashes)))

    def clear(self) -> None:
        """Forget every block (the caller makes sure none is in use)."""
        self._root.children.clear()
        self._nodes.clear()
        self._epoch += 1
        if self.enable_events:
            self._record(AllBlocksCleared())

    # ------------------------------------------------------------------ events
    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, oldest first; [] unless enable_events. The
        consumer's call: without one, leave events disabled."""
        events = list(self._events)
        self._events.clear()
        return events

    def take_event_batch(self, snapshot: bool = False) -> KVEventBatch:
        """take_events, with the drop count and, if `snapshot`, every cached block's hash: what a
        consumer that resynchronizes needs, in one cut."""
        return KVEventBatch(self.take_events(), self.num_dropped_events,
                            self.cached_block_hashes() if snapshot else None, self.block_size)

    def _record(self, event: KVEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.num_dropped_events += 1
        self._events.append(event)
