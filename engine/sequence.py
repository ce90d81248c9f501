"""One request's state inside an engine. Torch-free.

token_ids holds the prompt followed by the outputs; num_computed_tokens counts the leading tokens
whose K/V are in the pool. A sequence is scheduled while num_computed_tokens < num_tokens, and
samples its next token when a step brings num_computed_tokens up to num_tokens — so a prompt
prefill (chunked or not), a decode step, a recompute after preemption and a remote-KV commit are
all the same motion. Prefix-cache hits start a sequence with num_computed_tokens already at the
cached length: its first block_table entries are cached blocks shared with other sequences.
cache_node is the prefix-cache node of the last leading block of block_table registered in the
cache under this sequence's own ids (num_cached_blocks counts them); they are the only blocks that
may be shared, and a block is registered only once its block_size tokens are all computed. The
next registration continues from cache_node; it is reset when the blocks are freed.
prefix_match is the last lookup of a waiting sequence, resumed on its next admission attempt.
kv_stream (prefill-only requests whose K/V is sent while computed, engine/kv_stream.py) is
closed whenever the blocks are freed.
sampler_state is where the sampler keeps this sequence's running statistics between steps
(engine/sampler.py); opaque here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.radix_cache import PrefixMatch, RadixNode
from engine.request import FinishReason, RequestStatus, SamplingParams

if TYPE_CHECKING:
    from engine.kv_stream import KVStream


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
    cache_node: RadixNode | None = None  # None: no block registered
    prefix_match: PrefixMatch | None = None  # while waiting
    finish_reason: FinishReason | None = None
    sampler_state: dict[str, object] = field(default_factory=dict)
    num_cached_prompt_tokens: int | None = None  # prompt tokens the prefix cache held at admission
    kv_stream: KVStream | None = None  # prefill-only: its K/V read out while computed

    @property
    def num_cached_blocks(self) -> int:
        return 0 if self.cache_node is None else self.cache_node.depth

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
