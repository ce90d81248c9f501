"""The pool of KV blocks: integers only, no torch.

Every block id in [0, num_total_blocks) has a ref_cnt: the number of block tables holding it.
A block with ref_cnt 0 is free and sits on the free list exactly once; a block with ref_cnt > 0 is
used and is on no list. Free blocks come in two kinds, both allocatable:
    empty        - its contents mean nothing;
    cached-free  - registered in the prefix cache, its K/V still valid, so a later request with the
                   same prefix can take it back (`acquire`) instead of computing it.
num_free_blocks + num_used_blocks == num_total_blocks always.

The prefix cache (engine/radix_cache.py), when there is one, is built into the pool:
`BlockPool(n, prefix_cache=RadixCache(block_size))` is the one way to pair them, and the cache is
the only record of which blocks are cached (`is_cached(b)` is `b in prefix_cache`). The scheduler
registers blocks through `pool.prefix_cache`, so the cache it fills is the one the pool evicts from.

The free list is doubly linked through two int arrays with a sentinel, so removing a block from
its middle (a prefix-cache hit on a cached-free block) is O(1). `allocate` pops from the head,
`free` appends blocks reaching ref_cnt 0 to the tail in the order given. The head is therefore the
least recently freed block, and cached-free blocks are evicted least-recently-used: the cached-free
blocks one `allocate` pops are handed to `prefix_cache.evict` in pop order, so the cache forgets
them. Callers free a block table in reverse, so a sequence's deepest blocks are evicted
before its shallower ones (the prefix cache relies on this: it only ever evicts leaves).

Admission is two-step: `can_allocate(n)` then `allocate(n)`, which raises NoCapacityError rather
than allocating part of a request.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.radix_cache import RadixCache
from engine.request import NoCapacityError


class BlockPool:
    def __init__(self, num_blocks: int, prefix_cache: RadixCache | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_total_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self.prefix_cache = prefix_cache
        # The free list: node num_blocks is the sentinel; _next of the sentinel is the head.
        self._sentinel = num_blocks
        self._prev = [i - 1 for i in range(num_blocks + 1)]
        self._next = [i + 1 for i in range(num_blocks + 1)]
        self._prev[0] = self._sentinel
        self._next[num_blocks - 1] = self._sentinel
        self._prev[self._sentinel] = num_blocks - 1
        self._next[self._sentinel] = 0
        self._num_free = num_blocks

    # ------------------------------------------------------------------ counts
    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_cnt 0, empty or cached-free: all of them are allocatable."""
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self._num_free

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks

    def free_block_ids(self) -> list[int]:
        """The free list from head (next to be allocated) to tail. O(n): for tests and debugging."""
        block_ids = []
        block_id = self._next[self._sentinel]
        while block_id != self._sentinel:
            block_ids.append(block_id)
            block_id = self._next[block_id]
        return block_ids

    def is_cached(self, block_id: int) -> bool:
        return self.prefix_cache is not None and block_id in self.prefix_cache

    def num_free_among(self, block_ids: Iterable[int]) -> int:
        """How many of block_ids are free: acquiring them takes that many from num_free_blocks."""
        return sum(1 for block_id in block_ids if self.ref_cnt[block_id] == 0)

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self._num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Take num_blocks blocks from the head of the free list (evicting cached-free ones)."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self._num_free:
            raise NoCapacityError(
                f"need {num_blocks} KV blocks, only {self._num_free} of "
                f"{self.num_total_blocks} are free"
            )
        cache = self.prefix_cache
        block_ids = []
        for _ in range(num_blocks):
            block_id = self._next[self._sentinel]
            self._unlink(block_id)
            self.ref_cnt[block_id] = 1
            block_ids.append(block_id)
        if cache is not None:
            cache.evict([block_id for block_id in block_ids if block_id in cache])
        return block_ids

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block a prefix-cache hit found: a used block is shared, a
        cached-free block is taken out of the middle of the free list."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                if not self.is_cached(block_id):
                    raise ValueError(f"block {block_id} is free and not cached; cannot acquire it")
                self._unlink(block_id)
            self.ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching 0 go to the tail of the free list in
        the order given (pass a block table reversed, so its last block is evicted first)."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise ValueError(f"block {block_id} is already free")
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self._append(block_id)

    # ------------------------------------------------------------------ the free list
    def _unlink(self, block_id: int) -> None:
        prev, nxt = self._prev[block_id], self._next[block_id]
        self._next[prev] = nxt
        self._prev[nxt] = prev
        self._num_free -= 1

    def _append(self, block_id: int) -> None:
        tail = self._prev[self._sentinel]
        self._next[tail] = block_id
        self._prev[block_id] = tail
        self._next[block_id] = self._sentinel
        self._prev[self._sentinel] = block_id
        self._num_free += 1
