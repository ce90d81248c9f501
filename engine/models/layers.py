"""Building blocks shared by the model files: the linear-layer factory, RMSNorm and rotary embeddings.

Every projection in a model is created through `make_linear`, so weight quantization (int8
weight-only first) can replace it in one place later.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.models import cpu_kernels

# CPU kernels by tokens in the batch (measured on AVX2, SmolLM2-135M shapes): one token streams
# the weight once, fastest with our gemv (engine/models/cpu_kernels.py); up to 64 tokens our small
# GEMM is ~1.1-1.6x oneDNN's linear, which is itself faster than the default GEMM for projections
# wider than their input (the fallback where our kernels cannot run); beyond 64 tokens the default
# GEMM is as fast or faster.
SMALL_MAX_TOKENS = 64
_HAS_ONEDNN = torch.backends.mkldnn.is_available()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Module):
    """y = x W^T (+ b), W stored [out, in] contiguous as in HF checkpoints.

    The rows of a fused projection (qkv, gate+up) are filled shard by shard by the model's loader.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.widens = _HAS_ONEDNN and out_features > in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, out]
        if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
            num_tokens = x.shape[0]
            if num_tokens <= SMALL_MAX_TOKENS and (kernels := cpu_kernels.load()) is not None:
                if num_tokens == 1:
                    return kernels.gemv(x, self.weight, self.bias)
                if self.in_features % 8 == 0:
                    return kernels.gemm_small(x, self.weight, self.bias)
            if self.widens and num_tokens <= SMALL_MAX_TOKENS:
                return onednn_linear(x, self.weight, self.bias)
        return nn.functional.linear(x, self.weight, self.bias)


def make_linear(in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
    """The one place where models get their projections (the quantization hook)."""
    return Linear(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x); or, given the residual stream, residual += x (in place) and
        (RMSNorm(residual), residual) — the add and the norm in one pass on the CPU kernel."""
        on_cpu_f32 = x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
        if on_cpu_f32 and (kernels := cpu_kernels.load()) is not None:
            out = kernels.add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual += x
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the model dtype, as transformers does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32, on the CPU) for default, linear and llama3
    rope. Always on the CPU, even inside a meta-device context: meta arithmetic loads torch's
    compiler stack (~2 s); the caller moves the result."""
    positions = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (theta ** (positions.to(torch.float) / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type") or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(
        f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3"
    )


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, 1, head_dim] for positions [T], computed in float32 then cast.

    sin carries the sign of rotate-half (-sin on the first half), so apply_rope needs no negation.
    """
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    sin = freqs.sin()
    cos = freqs.cos().repeat(1, 2)  # [T, D]
    sin = torch.cat((-sin, sin), dim=-1)
    return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, 1, D] from rope_cos_sin. The rotate-half layout of HF checkpoints:
    x * cos + cat(-x2, x1) * sin, with the sign folded into sin and the halves swapped by a roll."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
