"""One request's state inside an engine. Torch-free.

token_ids holds the prompt followed by the outputs; num_computed_tokens counts the leading tokens
whose K/V are in the pool. A sequence is scheduled while num_computed_tokens < num_tokens, and
samples its next token when a step brings num_computed_tokens up to num_tokens — so a prompt
prefill (chunked or not), a decode step, a recompute after preemption and a remote-KV commit are
all the same motion. Prefix-cache hits start a sequence with num_computed_tokens already at the
cached length: its first block_table entries are cached blocks shared with other sequences.
num_cached_blocks counts the leading blocks of block_table registered in the prefix cache under
this sequence's own ids; they are the only blocks that may be shared, and a block is registered
only once its block_size tokens are all computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import FinishReason, RequestStatus, SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt + outputs
    num_prompt_tokens: int
    sampling: SamplingParams
    seed: int  # effective seed: the request's, or a random one drawn at admission
    prefill_only: bool = False
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]
