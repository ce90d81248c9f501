"""Symmetric int8 quantization of K/V for the wire, one scale per (layer, token group, KV head).

A group is `group_tokens` consecutive tokens counted from the first token of the tensor (the
chunk's token_start); the last group may be shorter. Within a group and head, scale =
max|x| / 127 over its tokens x head_dim, and q = round(x / scale), so |x - q * scale| <= scale / 2
(up to float32 rounding). An all-zero group has scale 0 and dequantizes to exact zeros.
Vectorized over every dimension: no Python loop over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127


def num_groups(num_tokens: int, group_tokens: int) -> int:
    return -(-num_tokens // group_tokens)


def quantize_int8(x: torch.Tensor, group_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [layers, tokens, heads, head_dim], a float dtype.

    Returns (q int8 [layers, tokens, heads, head_dim], scales float32 [layers, groups, heads]).
    Raises ValueError on non-finite values, which no scale can represent.
    """
    num_layers, num_tokens, num_heads, head_dim = x.shape
    groups = num_groups(num_tokens, group_tokens)
    pad = groups * group_tokens - num_tokens
    # zero padding at the end of the token dimension never raises a group's max
    padded = F.pad(x.detach().float(), (0, 0, 0, 0, 0, pad))  # [L, G * S, H, D]
    grouped = padded.view(num_layers, groups, group_tokens, num_heads, head_dim)
    scales = grouped.abs().amax(dim=(2, 4)) / INT8_MAX  # [L, G, H]
    if not torch.isfinite(scales).all():
        raise ValueError("K/V holds non-finite values; int8 compression needs finite ones")
    # Divide (a subnormal scale's reciprocal is inf, and 0 * inf is NaN); an all-zero group
    # divides by 1.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # [L, G, H]
    q = (grouped / safe[:, :, None, :, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    q = q.to(torch.int8).view(num_layers, groups * group_tokens, num_heads, head_dim)
    return q[:, :num_tokens].contiguous(), scales


def dequantize_int8(
    q: torch.Tensor, scales: torch.Tensor, group_tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """q int8 [layers, tokens, heads, head_dim], scales float32 [layers, groups, heads] ->
    [layers, tokens, heads, head_dim] in dtype."""
    group_of_token = torch.arange(q.shape[1]) // group_tokens  # [T]
    token_scales = scales[:, group_of_token]  # [L, T, H]
    return (q.float() * token_scales[..., None]).to(dtype)
