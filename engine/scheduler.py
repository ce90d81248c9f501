"""The scheduler: which sequences advance by how many tokens in the next forward pass. Torch-free.

One step function with a token budget (max_num_batched_tokens). Running sequences go first, in
admission order, each taking what it still lacks (one token for a decode, a chunk for a prefill);
then waiting sequences are admitted in FIFO order while budget, max_num_seqs and free blocks allow.
When a running sequence needs a block and none is free, the most recently admitted running sequence
is preempted: its blocks are freed and it returns to the head of the waiting queue, to be
recomputed from its prompt and outputs (greedy and seeded sampling are unaffected).

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
        self.block_pool = block_pool
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

    def reserve(self, seq: Sequence) -> None:
        """Allocate blocks for the whole prompt; the KV will be written from outside."""
        self._check_new(seq)
        num_blocks = self._blocks_for(seq.num_prompt_tokens)
        if not self.block_pool.can_allocate(num_blocks):
            raise NoCapacityError(
                f"request {seq.request_id} needs {num_blocks} KV blocks, "
                f"{self.block_pool.num_free_blocks} are free"
            )
        seq.block_table = self.block_pool.allocate(num_blocks)
        seq.status = RequestStatus.WAITING_FOR_KV
        self.reserved[seq.request_id] = seq
        self.requests[seq.request_id] = seq

    def commit(self, request_id: str, first_token_id: int) -> None:
        seq = self.reserved.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id} is not waiting for KV")
        del self.reserved[request_id]
        seq.num_computed_tokens = seq.num_prompt_tokens
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
        # The prompt plus the first output token must fit in the pool at least when alone.
        needed = self._blocks_for(seq.num_prompt_tokens + 1)
        if needed > self.block_pool.num_total_blocks:
            raise InvalidRequestError(
                f"the prompt has {seq.num_prompt_tokens} tokens and needs {needed} KV blocks, "
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
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            needed = self._blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
            if not self.block_pool.can_allocate(needed):
                break
            self.waiting.popleft()
            seq.block_table.extend(self.block_pool.allocate(needed))
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return scheduled

    def update(
        self, scheduled: list[ScheduledSequence], sampled_token_ids: list[int | None]
    ) -> list[RequestOutput]:
        """Advance the scheduled sequences; sampled_token_ids[i] is None where none sampled."""
        outputs = self.take_pending()
        finished: list[Sequence] = []
        for item, token_id in zip(scheduled, sampled_token_ids):
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if token_id is None:
                continue
            seq.token_ids.append(token_id)
            done = self._check_finish(seq)
            outputs.append(RequestOutput(seq.request_id, [token_id], seq.finish_reason))
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
        self.block_pool.free(seq.block_table)
        seq.block_table = []
        seq.status = RequestStatus.FINISHED
        self.requests.pop(seq.request_id, None)

    def _preempt(self, seq: Sequence) -> None:
        logger.info(
            "request %s: preempted at %d tokens (KV blocks exhausted); will recompute",
            seq.request_id, seq.num_tokens,
        )
        self.stats.num_preemptions += 1
        self.block_pool.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = RequestStatus.WAITING
        self.waiting.appendleft(seq)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)
