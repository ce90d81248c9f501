"""The paged KV pool: per layer, K and V as [num_blocks, block_size, num_kv_heads, head_dim].

Blocks are handed out by engine.block_pool; this module only holds the tensors and moves token
ranges in and out of them (for KV transfer). The pool is zero-filled so that gathered padding
slots (masked out in attention) never hold NaN.
"""

from __future__ import annotations

import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def slots(self, block_table: list[int], token_start: int, token_end: int) -> torch.Tensor:
        """Flat slot index of each token in [token_start, token_end): [n] int64 on the pool device."""
        positions = torch.arange(token_start, token_end)
        table = torch.tensor(block_table, dtype=torch.int64)
        slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
        return slots.to(self.k_caches[0].device)

    def read(
        self, layer_start: int, layer_end: int, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: contiguous CPU tensors [layer_end - layer_start, len(slots), Hkv, D]."""
        ks = [self._flat(self.k_caches[i])[slots] for i in range(layer_start, layer_end)]
        vs = [self._flat(self.v_caches[i])[slots] for i in range(layer_start, layer_end)]
        return torch.stack(ks).cpu().contiguous(), torch.stack(vs).cpu().contiguous()

    def write(
        self, layer_start: int, layer_end: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v: [layer_end - layer_start, len(slots), Hkv, D], any float dtype or device."""
        device = self.k_caches[0].device
        k = k.to(device=device, dtype=self.dtype)
        v = v.to(device=device, dtype=self.dtype)
        for j, i in enumerate(range(layer_start, layer_end)):
            self._flat(self.k_caches[i])[slots] = k[j]
            self._flat(self.v_caches[i])[slots] = v[j]

    def _flat(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.view(-1, self.num_kv_heads, self.head_dim)
