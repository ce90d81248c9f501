"""The router's global prefix index: which worker holds which cached KV blocks.

Pure: plain Python over block hashes; no I/O, redis or grpc. router/kv_events.py feeds it from the
workers' event streams in Redis; the routing policy (router/routing.py) reads it through `match`.

A block is named by its chained content hash (engine/radix_cache.py `hash_block`): the hash of a
block covers every token before it, so a worker that holds the hash of a prompt's i-th block holds
KV for the prompt's first (i + 1) × block_size tokens, given that it holds the blocks before it too
(the radix cache's leaf invariant: a cached block's parent is cached). `match` therefore walks the
prompt's chain from the first block and, per worker, stops at the first hash the worker lacks.

Per worker the index keeps the set of hashes and the block size its events carry. Updates:
    stored(worker, hashes, block_size)   blocks became cached on the worker
    removed(worker, hashes)              blocks were evicted
    replace(worker, hashes, block_size)  a snapshot: the worker's whole cache, as of now
    forget(worker)                       the worker left (or its stream is unreadable)
The index can only be as fresh as the events: a worker may have evicted a block the router still
lists. Routing treats the overlap as a score, never as a promise; the worker's own radix match is
what decides what is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.radix_cache import hash_block


@dataclass(frozen=True)
class PrefixAnswer:
    """What the index knows for one prompt, per worker."""

    cached_tokens: dict[str, int]  # the prompt's prefix each worker holds
    num_blocks: dict[str, int]  # all the blocks each worker holds (cold prompts go to the emptiest)


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> the workers that hold it
        self._blocks: dict[str, set[int]] = {}  # worker id -> the block hashes it holds
        self._block_size: dict[str, int] = {}  # worker id -> its KV block size (in tokens)

    def __len__(self) -> int:
        """The number of distinct blocks indexed."""
        return len(self._holders)

    def workers(self) -> list[str]:
        return sorted(self._blocks)

    def num_blocks(self, worker_id: str) -> int:
        return len(self._blocks.get(worker_id, ()))

    # ------------------------------------------------------------------ updates
    def stored(self, worker_id: str, hashes: Iterable[int], block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if self._block_size.setdefault(worker_id, block_size) != block_size:
            # A worker's block size never changes while it lives; a new one means a new cache.
            self.forget(worker_id)
            self._block_size[worker_id] = block_size
        mine = self._blocks.setdefault(worker_id, set())
        for h in hashes:
            if h not in mine:
                mine.add(h)
                self._holders.setdefault(h, set()).add(worker_id)

    def removed(self, worker_id: str, hashes: Iterable[int]) -> None:
        mine = self._blocks.get(worker_id)
        if mine is None:
            return
        for h in hashes:
            if h in mine:
                mine.discard(h)
                self._drop_holder(h, worker_id)

    def replace(self, worker_id: str, hashes: Iterable[int], block_size: int) -> None:
        self.forget(worker_id)
        self._blocks[worker_id] = set()  # known, possibly empty: a snapshot of nothing
        self.stored(worker_id, hashes, block_size)

    def forget(self, worker_id: str) -> None:
        for h in self._blocks.pop(worker_id, ()):
            self._drop_holder(h, worker_id)
        self._block_size.pop(worker_id, None)

    def retain(self, worker_ids: Iterable[str]) -> None:
        """Forget every worker not in worker_ids."""
        keep = set(worker_ids)
        for worker_id in [w for w in self._blocks if w not in keep]:
            self.forget(worker_id)

    def clear(self) -> None:
        self._holders.clear()
        self._blocks.clear()
        self._block_size.clear()

    def _drop_holder(self, block_hash: int, worker_id: str) -> None:
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[block_hash]

    # ------------------------------------------------------------------ queries
    def lookup(self, token_ids: Sequence[int], worker_ids: Iterable[str]) -> PrefixAnswer:
        """match() and num_blocks() for the given workers, in one answer for the router."""
        worker_ids = list(worker_ids)
        return PrefixAnswer(self.match(token_ids, worker_ids),
                            {w: self.num_blocks(w) for w in worker_ids})

    def match(self, token_ids: Sequence[int],
              worker_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Cached prefix length in tokens, per indexed worker (of worker_ids, if given), of
        token_ids' full blocks. Workers with nothing cached map to 0."""
        candidates = set(self._blocks) if worker_ids is None else set(worker_ids) & set(self._blocks)
        matched = dict.fromkeys(candidates, 0)
        by_block_size: dict[int, set[str]] = {}
        for worker_id in candidates:
            by_block_size.setdefault(self._block_size[worker_id], set()).add(worker_id)
        for block_size, alive in by_block_size.items():
            h = None
            for end in range(block_size, len(token_ids) + 1, block_size):
                h = hash_block(h, token_ids[end - block_size : end])  # the chain, lazily
                alive = alive & self._holders.get(h, set())
                if not alive:
                    break
                for worker_id in alive:
                    matched[worker_id] = end
        return matched
