"""The scheduler: which sequences advance by how many tokens in the next forward pass. Torch-free.

One step function with a token budget (max_num_batched_tokens). Running sequences go first, in
admission order, each taking what it still lacks (one token for a decode, a chunk for a prefill);
then waiting sequences are admitted in FIFO order while budget, max_num_seqs and free blocks allow.
When a running sequence needs a block and none is free, the most recently admitted running sequence
is preempted: its blocks are freed and it returns to the head of the waiting queue, to be
recomputed from its prompt and outputs (greedy and seeded sampling are unaffected).

With a prefix cache (the block pool's, engine/radix_cache.py), admission looks up the sequence's
tokens but the last (at least one token is always computed, for its logits), takes the cached
blocks found and starts the sequence at num_computed_tokens = hits * block_size; a reservation
looks up the whole prompt. Both go through `_take_blocks`. A head of the waiting queue that must
wait for blocks keeps its lookup and resumes it on the next step (valid until a block is evicted).
After every step, blocks that became full of computed tokens are registered in the cache,
continuing from the sequence's last registered node (a reservation's only at commit, once its K/V
has arrived). Block tables are freed in reverse, so a sequence's blocks stay cached (cached-free)
until evicted, deepest first; a preempted sequence usually finds its own blocks again when it is
recomputed. Block tables only ever grow while a sequence holds them: a block computed twice stays
a private copy rather than being swapped.

Lifecycle of a sequence here:
    add -> waiting -> running -> finished (blocks freed; reported once by update/take_pending)
    reserve -> reserved (WAITING_FOR_KV, blocks held) -> commit -> running -> ...
    prefill_only: running -> held (FINISHED, blocks kept) after its first token -> release
Abort removes a sequence from any of these and frees its blocks.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from engine.block_pool import BlockPool
from engine.request import (
    FinishReason,
    InvalidRequestError,
    NoCapacityError,
    RequestOutput,
    RequestStatus,
    TokenLogprob,
)
from engine.sequence import Sequence
from engine.stats import EngineStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this pass completes the sequence's known tokens, so it samples the next one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_pool: BlockPool,
        *,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: frozenset[int],
    ) -> None:
        """Prefix caching is on when block_pool was built with a prefix cache."""
        prefix_cache = block_pool.prefix_cache
        if prefix_cache is not None and prefix_cache.block_size != block_size:
            raise ValueError(
                f"the prefix cache's block_size {prefix_cache.block_size} != block_size {block_size}"
            )
        self.block_pool = block_pool
        self.prefix_cache = prefix_cache
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved: dict[str, Sequence] = {}  # WAITING_FOR_KV
        self.held: dict[str, Sequence] = {}  # prefill_only, finished, blocks kept for read-out
        self.requests: dict[str, Sequence] = {}  # every sequence above
        self._pending: list[RequestOutput] = []  # outputs produced outside a forward pass
        self.stats = EngineStats()

    # ------------------------------------------------------------------ admission
    def add(self, seq: Sequence) -> None:
        self._check_new(seq)
        seq.status = RequestStatus.WAITING
        self.waiting.append(seq)
        self.requests[seq.request_id] = seq

    def reserve(self, seq: Sequence) -> int:
        """Take the cached blocks of the prompt's longest cached prefix and allocate the rest; the
        K/V of the uncached tokens will be written from outside. Returns the number of cached
        tokens (a multiple of block_size; possibly the whole prompt)."""
        self._check_new(seq)
        self._take_blocks(seq, seq.num_prompt_tokens, seq.num_prompt_tokens)
        seq.status = RequestStatus.WAITING_FOR_KV
        self.reserved[seq.request_id] = seq
        self.requests[seq.request_id] = seq
        return seq.num_computed_tokens

    def commit(self, request_id: str, first_token_id: int) -> None:
        seq = self.reserved.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id} is not waiting for KV")
        del self.reserved[request_id]
        seq.num_computed_tokens = seq.num_prompt_tokens
        self._cache_full_blocks(seq)
        seq.token_ids.append(first_token_id)
        seq.status = RequestStatus.RUNNING
        if self._check_finish(seq):
            self._finish(seq)
            self._pending.append(RequestOutput(request_id, [], seq.finish_reason))
        else:
            self.running.append(seq)

    def _check_new(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise InvalidRequestError(
                f"request id {seq.request_id!r} is already in use", "request_id"
            )
        # The tokens so far (the prompt, and the outputs of a resumed request) plus the next
        # output must fit in the pool at least when alone.
        needed = self._blocks_for(seq.num_tokens + 1)
        if needed > self.block_pool.num_total_blocks:
            raise InvalidRequestError(
                f"the prompt has {seq.num_tokens} tokens and needs {needed} KV blocks, "
                f"but the KV pool has only {self.block_pool.num_total_blocks} blocks of "
                f"{self.block_size} tokens",
                "prompt",
            )

    # ------------------------------------------------------------------ stepping
    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            needed = self._blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
            while needed > self.block_pool.num_free_blocks and self.running[-1] is not seq:
                self._preempt(self.running.pop())
                preempted = True
            if needed > self.block_pool.num_free_blocks:
                self.running.pop(i)  # seq is the last running sequence
                if self._blocks_for(seq.num_computed_tokens + num_new) > (
                    self.block_pool.num_total_blocks
                ):
                    logger.warning(
                        "request %s: KV pool too small to grow past %d tokens; finishing it",
                        seq.request_id, seq.num_tokens,
                    )
                    seq.finish_reason = FinishReason.LENGTH
                    self._finish(seq)
                    self._pending.append(RequestOutput(seq.request_id, [], FinishReason.LENGTH))
                else:
                    self._preempt(seq)
                    preempted = True
                break
            seq.block_table.extend(self.block_pool.allocate(needed))
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1

        while (
            self.waiting and budget > 0 and not preempted
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            # A waiting sequence holds no block (new, or preempted); the last token is computed.
            try:
                num_new = self._take_blocks(seq, seq.num_tokens - 1, budget)
            except NoCapacityError:
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return scheduled

    def update(
        self,
        scheduled: list[ScheduledSequence],
        sampled_token_ids: list[int | None],
        logprobs: list[TokenLogprob | None] | None = None,
    ) -> list[RequestOutput]:
        """Advance the scheduled sequences; sampled_token_ids[i] is None where none sampled;
        logprobs (None when no sequence asked) is parallel to it."""
        outputs = self.take_pending()
        finished: list[Sequence] = []
        for i, (item, token_id) in enumerate(zip(scheduled, sampled_token_ids)):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if seq.num_computed_tokens // self.block_size > (
                (seq.num_computed_tokens - item.num_new_tokens) // self.block_size
            ):
                self._cache_full_blocks(seq)
            if token_id is None:
                continue
            seq.token_ids.append(token_id)
            done = self._check_finish(seq)
            token_logprob = None if logprobs is None else logprobs[i]
            outputs.append(RequestOutput(
                seq.request_id, [token_id], seq.finish_reason,
                None if token_logprob is None else [token_logprob],
                seq.num_cached_prompt_tokens if seq.num_output_tokens == 1 else None,
            ))
            if done or seq.prefill_only:
                finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            if seq.prefill_only:
                seq.status = RequestStatus.FINISHED
                self.held[seq.request_id] = seq
            else:
                self._finish(seq)
        return outputs

    def take_pending(self) -> list[RequestOutput]:
        pending, self._pending = self._pending, []
        return pending

    def has_pending(self) -> bool:
        return bool(self._pending)

    # ------------------------------------------------------------------ removal
    def abort(self, request_id: str) -> bool:
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        self.reserved.pop(request_id, None)
        self.held.pop(request_id, None)
        seq.finish_reason = FinishReason.ABORT
        self._finish(seq)
        return True

    def release(self, request_id: str) -> None:
        seq = self.held.pop(request_id, None)
        if seq is None:
            raise ValueError(f"request {request_id} is not a finished prefill_only request")
        self._finish(seq)

    # ------------------------------------------------------------------ helpers
    def _check_finish(self, seq: Sequence) -> bool:
        token_id = seq.token_ids[-1]
        sampling = seq.sampling
        if not sampling.ignore_eos and token_id in self.eos_token_ids or token_id in sampling.stop_token_ids:
            seq.finish_reason = FinishReason.STOP
        elif seq.num_output_tokens >= sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = FinishReason.LENGTH
        return seq.finish_reason is not None

    def _finish(self, seq: Sequence) -> None:
        """Free the sequence's blocks and forget it."""
        self._free_blocks(seq, "aborted" if seq.finish_reason is FinishReason.ABORT else "released")
        seq.status = RequestStatus.FINISHED
        self.requests.pop(seq.request_id, None)

    def _preempt(self, seq: Sequence) -> None:
        logger.info(
            "request %s: preempted at %d tokens (KV blocks exhausted); will recompute",
            seq.request_id, seq.num_tokens,
        )
        self.stats.num_preemptions += 1
        self._free_blocks(seq, "preempted (KV blocks exhausted)")
        seq.num_computed_tokens = 0
        seq.status = RequestStatus.WAITING
        self.waiting.appendleft(seq)

    def _take_blocks(self, seq: Sequence, num_lookup_tokens: int, max_new_tokens: int) -> int:
        """Admit seq's blocks: look up its first num_lookup_tokens tokens in the prefix cache,
        take the cached blocks found and fresh ones for up to max_new_tokens tokens after them.
        Returns the number of tokens left to compute now. Raises NoCapacityError, taking nothing,
        when the blocks are not free; the lookup stays in seq.prefix_match for the next try."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(
                f"request {seq.request_id}: admitted while holding {len(seq.block_table)} blocks "
                f"and {seq.num_computed_tokens} computed tokens"
            )
        match, hit_ids = None, []
        if self.prefix_cache is not None:
            match = self.prefix_cache.lookup(seq.token_ids, seq.prefix_match, num_lookup_tokens)
            seq.prefix_match, hit_ids = match, match.block_ids
        num_computed = len(hit_ids) * self.block_size
        num_new = min(seq.num_tokens - num_computed, max_new_tokens)
        num_blocks = self._blocks_for(num_computed + num_new) - len(hit_ids)
        # Cached-free hits leave the free list too.
        num_taken = num_blocks + self.block_pool.num_free_among(hit_ids)
        if not self.block_pool.can_allocate(num_taken):
            raise NoCapacityError(
                f"request {seq.request_id} needs {num_taken} KV blocks, "
                f"{self.block_pool.num_free_blocks} are free"
            )
        # Acquire first: the allocation may evict cached-free blocks, never these.
        self.block_pool.acquire(hit_ids)
        seq.block_table = hit_ids + self.block_pool.allocate(num_blocks)
        seq.num_computed_tokens = num_computed
        if seq.num_cached_prompt_tokens is None:  # the first admission; not a recompute
            seq.num_cached_prompt_tokens = min(num_computed, seq.num_prompt_tokens)
        if match is not None:
            seq.cache_node, seq.prefix_match = match.node, None
            self.stats.prefix_cache_queries += seq.num_tokens
            self.stats.prefix_cache_hits += seq.num_computed_tokens
            if hit_ids:
                logger.debug("request %s: %d of %d tokens cached", seq.request_id,
                             seq.num_computed_tokens, seq.num_tokens)
        return num_new

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks whose tokens are all computed, from its last registered one."""
        if self.prefix_cache is None:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        num_cached = seq.num_cached_blocks
        if num_full <= num_cached:
            return
        node = self.prefix_cache.insert(seq.token_ids, seq.block_table[:num_full], seq.cache_node)
        if node.depth < num_cached:  # its own registered blocks are in use: never evicted
            raise RuntimeError(
                f"request {seq.request_id}: {node.depth} blocks cached under its ids, "
                f"{num_cached} were"
            )
        seq.cache_node = node

    def _free_blocks(self, seq: Sequence, why: str) -> None:
        if seq.kv_stream is not None:  # first: a reader must be done with the blocks
            seq.kv_stream.close(f"its KV blocks were freed: {why}")
        # In reverse: the deepest blocks reach the free list first and are evicted first.
        self.block_pool.free(reversed(seq.block_table))
        seq.block_table = []
        seq.cache_node = None

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
