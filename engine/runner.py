"""The model runner: turns a scheduled batch into one forward pass and samples. Torch lives here.

Inputs are laid out with single-token sequences (decodes) first, then multi-token ones (prefill
chunks), as AttentionMetadata requires; logits are computed only for sequences that sample this
step (their last scheduled token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.kv_cache import KVCache
from engine.models.attention import AttentionMetadata
from engine.models.llama import LlamaModel
from engine.request import TokenLogprob
from engine.sampler import SamplingRow, sample, token_logprobs
from engine.scheduler import ScheduledSequence


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledSequence], on_layer: Callable[[int], None] | None = None
    ) -> tuple[list[int | None], list[TokenLogprob | None] | None]:
        """One forward pass; returns the sampled token per scheduled entry (None if none), and
        their logprobs where requested (the list is None when no entry asked). on_layer(i), if
        given, is called as soon as decoder layer i has stored this pass's K/V."""
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        batch = [scheduled[i] for i in order]
        input_ids: list[int] = []
        query_lens, context_lens, block_tables = [], [], []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + item.num_new_tokens])
            query_lens.append(item.num_new_tokens)
            context_lens.append(start + item.num_new_tokens)
            block_tables.append(seq.block_table)
        meta = AttentionMetadata.build(
            query_lens, context_lens, block_tables, self.kv_cache.block_size, self.device
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(self.device)
        hidden = self.model(ids, meta, self.kv_cache.k_caches, self.kv_cache.v_caches,
                            on_layer=on_layer)  # [T, dim]

        sampling_pos = [j for j, item in enumerate(batch) if item.samples]
        result: list[int | None] = [None] * len(scheduled)
        if not sampling_pos:
            return result, None
        last_token = meta.query_start_loc[1:] - 1  # [B]
        rows_index = torch.tensor(sampling_pos, dtype=torch.int64).to(self.device)
        logits = self.model.compute_logits(hidden[last_token[rows_index]])  # [N, vocab]
        seqs = [batch[j].seq for j in sampling_pos]
        rows = [
            SamplingRow(s.sampling, s.seed, s.num_output_tokens, s.token_ids, s.num_prompt_tokens,
                        s.sampler_state)
            for s in seqs
        ]
        token_ids = sample(logits, rows)
        logprobs = token_logprobs(logits, rows, token_ids)  # None unless a row asks
        result_logprobs: list[TokenLogprob | None] | None = None
        if logprobs is not None:
            result_logprobs = [None] * len(scheduled)
        for r, j in enumerate(sampling_pos):
            result[order[j]] = token_ids[r]
            if result_logprobs is not None:
                result_logprobs[order[j]] = logprobs[r]
        return result, result_logprobs
