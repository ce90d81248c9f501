"""The pool of KV blocks: integers only, no torch.

Invariants: every block id in [0, num_total_blocks) is either free (ref_cnt 0, on the free list
exactly once) or used (ref_cnt > 0, off the free list); num_free + num_used == num_total.
Allocation takes blocks from the head of the free list, freeing appends them to the tail (so a
freed block is reused as late as possible, which the prefix cache will rely on).
Admission is two-step: `can_allocate(n)` then `allocate(n)`, which raises NoCapacityError rather
than allocating part of a request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine.request import NoCapacityError


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_total_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_total_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free):
            raise NoCapacityError(
                f"need {num_blocks} KV blocks, only {len(self._free)} of "
                f"{self.num_total_blocks} are free"
            )
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self.ref_cnt[block_id] = 1
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share used blocks (prefix caching, forking)."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise ValueError(f"block {block_id} is free; cannot share it")
            self.ref_cnt[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; blocks that reach 0 go to the tail of the free list."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise ValueError(f"block {block_id} is already free")
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self._free.append(block_id)
