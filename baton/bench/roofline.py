"""This machine's roofline, measured, and a model's arithmetic, counted from its config.

Two rates bound an fp32 decoder on a CPU: memory read bandwidth (every decode step reads all the
weights once, so one stream cannot beat read GB/s / weight bytes tokens/s) and GEMM throughput
(a token costs 2 FLOPs per parameter, so no batch beats GEMM FLOP/s / (2 x parameters) tokens/s).
Both are measured here with all torch threads, best of a few runs. Parameters are counted from
ModelConfig, not from the engine's modules, so fused or repacked weights count the same; tied
embeddings count once.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from engine.config import ModelConfig


def gemm_flops_per_s(size: int = 2048, num_repeats: int = 10) -> float:
    """Best fp32 FLOP/s of a [size, size] @ [size, size] matmul."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    a @ b  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(num_repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def read_bytes_per_s(num_bytes: int = 256 << 20, num_repeats: int = 5) -> float:
    """Best memory read rate of x.sum() over num_bytes of float32 (far larger than the caches)."""
    x = torch.ones(num_bytes // 4)
    x.sum()
    best = float("inf")
    for _ in range(num_repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def copy_bytes_per_s(num_bytes: int = 64 << 20, num_repeats: int = 5) -> float:
    """Best rate of dst.copy_(src) over num_bytes of float32 into a preallocated tensor, counted
    in bytes copied (each is read once and written once)."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: pages of dst touched
    best = float("inf")
    for _ in range(num_repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return src.numel() * 4 / best


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load_average_1m() -> float:
    return os.getloadavg()[0]


# ---- the model's arithmetic ----------------------------------------------------------------------


def _layer_matmul_params(mc: ModelConfig) -> int:
    """Weights of one decoder layer's matmuls: q, k, v, o, gate, up, down."""
    q_size, kv_size = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    return mc.hidden_size * (2 * q_size + 2 * kv_size) + 3 * mc.hidden_size * mc.intermediate_size


def count_parameters(mc: ModelConfig) -> int:
    """All parameters, tied embeddings once (as transformers' num_parameters() counts them)."""
    q_size, kv_size = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    per_layer = _layer_matmul_params(mc) + 2 * mc.hidden_size  # + two norms
    if mc.attention_bias:
        per_layer += q_size + 2 * kv_size
    embedding = mc.vocab_size * mc.hidden_size
    lm_head = 0 if mc.tie_word_embeddings else embedding
    return embedding + mc.num_layers * per_layer + mc.hidden_size + lm_head


def prefill_flops(mc: ModelConfig, num_tokens: int) -> int:
    """FLOPs of a prefill of num_tokens from an empty cache, logits for the last token only.

    Matmuls: 2 per weight per token. Attention: q.k and p.v over the causal pairs, 2 x head_dim
    each, per head and layer (sum over positions i of i pairs = T (T + 1) / 2).
    """
    matmuls = 2 * num_tokens * mc.num_layers * _layer_matmul_params(mc)
    num_pairs = num_tokens * (num_tokens + 1) // 2
    attention = 2 * 2 * mc.head_dim * mc.num_heads * mc.num_layers * num_pairs
    logits = 2 * mc.vocab_size * mc.hidden_size
    return matmuls + attention + logits
