"""Paged attention in plain torch, driven by an explicit AttentionMetadata (no module globals).

A forward pass covers a flattened batch of T tokens from B sequences. Sequences whose query is a
single token (decodes, and one-token prefill chunks) come first, then multi-token (prefill)
sequences. For each layer: the new tokens' K/V are written into the paged pool at `slot_mapping`,
then attention runs for the single-token group and the multi-token group, each vectorized over its
sequences. Single-token sequences use the CPU decode kernel (engine/models/cpu_kernels.py), which
reads the paged pool in place, where it applies; otherwise, and for multi-token sequences, each
sequence's context is gathered through its block table and fed to `scaled_dot_product_attention`
with a boolean mask.

Pool layout per layer: [num_blocks, block_size, num_kv_heads, head_dim]; a token at position p of a
sequence lives in block block_table[p // block_size], row p % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.models import cpu_kernels


@dataclass
class AttentionMetadata:
    """Everything attention needs about one forward pass. Build it with `build`."""

    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat slot (block * block_size + row) for its K/V
    query_start_loc: torch.Tensor  # [B + 1] int64, token offsets of each sequence in the batch
    context_lens: torch.Tensor  # [B] int64, tokens of context after this pass (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with block 0
    num_single: int  # the first num_single sequences have exactly one query token
    # Derived once per pass and shared by every layer.
    single_max_len: int  # Ls: the single-token group's longest context, rounded up to a block
    multi_mask: torch.Tensor | None  # [Bm, 1, Qm, Lm] bool
    multi_pad_index: torch.Tensor | None  # [Tm] int64, row of each multi token in [Bm * Qm]
    multi_max_query_len: int
    _single_mask: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def single_mask(self) -> torch.Tensor | None:
        """[Bs, 1, 1, Ls] bool, True = attend; None without single-token sequences. Built on
        first use and kept for the other layers: only the torch path reads it (the CPU decode
        kernel takes context_lens)."""
        if self._single_mask is None and self.num_single:
            keys = torch.arange(self.single_max_len, device=self.context_lens.device)
            mask = keys[None, :] < self.context_lens[: self.num_single, None]  # [Bs, Ls]
            self._single_mask = mask[:, None, None, :]
        return self._single_mask

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """query_lens / context_lens / block_tables per sequence, single-token sequences first."""
        num_seqs = len(query_lens)
        num_single = 0
        while num_single < num_seqs and query_lens[num_single] == 1:
            num_single += 1
        if any(q == 1 for q in query_lens[num_single:]):
            raise ValueError("single-token sequences must come first in the batch")

        # Integer bookkeeping in numpy on the CPU, then one copy per tensor to the device.
        max_blocks = max(len(t) for t in block_tables)
        tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)  # padded with block 0
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = table
        q_lens = np.asarray(query_lens, dtype=np.int64)
        ctx_lens = np.asarray(context_lens, dtype=np.int64)
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=starts[1:])
        num_tokens = int(starts[-1])
        seq_index = np.repeat(np.arange(num_seqs), q_lens)  # [T]
        row_in_seq = np.arange(num_tokens) - starts[seq_index]  # [T]
        positions = ctx_lens[seq_index] - q_lens[seq_index] + row_in_seq  # [T]
        slots = tables[seq_index, positions // block_size] * block_size + positions % block_size

        def to_device(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(device)

        single_max_len = 0
        if num_single:
            single_max_len = _round_up(int(ctx_lens[:num_single].max()), block_size)

        multi_mask = multi_pad_index = None
        max_q = 0
        if num_single < num_seqs:
            num_multi = num_seqs - num_single
            max_q = int(q_lens[num_single:].max())
            max_len = _round_up(int(ctx_lens[num_single:].max()), block_size)
            # Tokens num_single.. belong to multi-token sequences (one token per single sequence).
            pad_index = (seq_index[num_single:] - num_single) * max_q + row_in_seq[num_single:]
            # Padding query rows get position 0 so they attend to one key and never produce NaN.
            q_pos = np.zeros(num_multi * max_q, dtype=np.int64)
            q_pos[pad_index] = positions[num_single:]
            mask = np.arange(max_len)[None, None, :] <= q_pos.reshape(num_multi, max_q)[:, :, None]
            multi_mask = to_device(mask)[:, None, :, :]  # [Bm, 1, Qm, Lm]
            multi_pad_index = to_device(pad_index)
        return cls(
            positions=to_device(positions),
            slot_mapping=to_device(slots),
            query_start_loc=to_device(starts),
            context_lens=to_device(ctx_lens),
            block_tables=to_device(tables),
            num_single=num_single,
            single_max_len=single_max_len,
            multi_mask=multi_mask,
            multi_pad_index=multi_pad_index,
            multi_max_query_len=max_q,
        )


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_keys: int) -> torch.Tensor:
    """cache [N, bs, Hkv, D], block_tables [B, *] -> [B, Hkv, num_keys, D]."""
    num_seqs, block_size = block_tables.shape[0], cache.shape[1]
    tables = block_tables[:, : num_keys // block_size]  # [B, nb]
    # index_select: advanced indexing (cache[tables]) is ~1000x slower on CPU for large pools.
    kv = cache.index_select(0, tables.reshape(-1))  # [B * nb, bs, Hkv, D]
    return kv.view(num_seqs, num_keys, *cache.shape[2:]).transpose(1, 2)


def _cpu_kernels(q: torch.Tensor, k_cache: torch.Tensor) -> cpu_kernels.CpuKernels | None:
    """The CPU kernels, where they apply (float32 queries and pool on the CPU)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or k_cache.dtype != torch.float32:
        return None
    return cpu_kernels.load()


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D]; returns [T, H, D]. Writes k, v into the caches."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    kernels = _cpu_kernels(q, k_cache)
    if kernels is not None:
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        k_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = v.to(v_cache.dtype)
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads  # query heads per KV head (GQA/MQA), consecutive heads
    num_single = meta.num_single
    if kernels is not None and meta.multi_mask is None:  # decode only: in place, no gather
        return kernels.decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, head_dim**-0.5
        )
    out = torch.empty_like(q)
    if kernels is not None and num_single:
        out[:num_single] = kernels.decode_attention(
            q[:num_single], k_cache, v_cache, meta.block_tables[:num_single],
            meta.context_lens[:num_single], head_dim**-0.5,
        )
    elif num_single:
        mask = meta.single_mask  # [Bs, 1, 1, Ls]
        keys = _gather(k_cache, meta.block_tables[:num_single], mask.shape[-1]).to(q.dtype)
        values = _gather(v_cache, meta.block_tables[:num_single], mask.shape[-1]).to(q.dtype)
        # Fold each KV head's query heads into the query axis: no K/V copy for GQA.
        q_single = q[:num_single].view(num_single, num_kv_heads, group, head_dim)
        o = F.scaled_dot_product_attention(q_single, keys, values, attn_mask=mask)
        out[:num_single] = o.reshape(num_single, num_heads, head_dim)  # [Bs, Hkv, G, D]
    if meta.multi_mask is not None:
        mask = meta.multi_mask  # [Bm, 1, Qm, Lm]
        num_multi, max_q = mask.shape[0], mask.shape[2]
        tables = meta.block_tables[num_single:]
        keys = _gather(k_cache, tables, mask.shape[-1]).to(q.dtype)  # [Bm, Hkv, Lm, D]
        values = _gather(v_cache, tables, mask.shape[-1]).to(q.dtype)
        q_multi = q.new_zeros(num_multi * max_q, num_heads, head_dim)
        q_multi[meta.multi_pad_index] = q[num_single:]
        # [Bm, Qm, Hkv, G, D] -> [Bm, Hkv, G * Qm, D]; the mask repeats over G to match.
        q_multi = q_multi.view(num_multi, max_q, num_kv_heads, group, head_dim)
        q_multi = q_multi.permute(0, 2, 3, 1, 4).reshape(num_multi, num_kv_heads, group * max_q, head_dim)
        if group > 1:
            mask = mask.repeat(1, 1, group, 1)
        o = F.scaled_dot_product_attention(q_multi, keys, values, attn_mask=mask)
        o = o.view(num_multi, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(num_multi * max_q, num_heads, head_dim)
        out[num_single:] = o[meta.multi_pad_index]
    return out
