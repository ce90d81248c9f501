"""The CPU decode kernels against torch's own operators, on shapes that exercise every tail."""

from __future__ import annotations

import subprocess

import pytest
import torch

from engine.models import attention, cpu_kernels
from engine.models.attention import AttentionMetadata, paged_attention
from engine.models.layers import Linear

pytestmark = pytest.mark.unit

kernels = cpu_kernels.load()
needs_kernels = pytest.mark.skipif(
    kernels is None, reason="CPU kernels unavailable here (not x86-64 with AVX2/FMA, or no C compiler)"
)


@needs_kernels
@pytest.mark.parametrize("n_out, n_in", [(576, 576), (960, 576), (13, 8), (8, 13), (17, 1537), (3, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_torch_linear(n_out, n_in, bias):
    torch.manual_seed(n_out * n_in)
    weight = torch.randn(n_out, n_in)
    b = torch.randn(n_out) if bias else None
    x = torch.randn(1, n_in)
    got = kernels.gemv(x, weight, b)
    assert got.shape == (1, n_out)
    # A sum of n_in products of unit normals: float32 rounding grows like sqrt(n_in).
    expected = torch.nn.functional.linear(x, weight, b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * n_in**0.5)


def test_linear_takes_the_same_value_on_every_path(monkeypatch):
    """One token (gemv), a few tokens (our small GEMM, or oneDNN for a widening projection where
    our kernels cannot run), many tokens (the default GEMM)."""
    from engine.models import layers

    calls = {"gemv": 0, "gemm_small": 0, "onednn": 0}
    if kernels is not None:
        for name in ("gemv", "gemm_small"):
            kernel = getattr(kernels, name)

            def counting(*args, name=name, kernel=kernel):
                calls[name] += 1
                return kernel(*args)

            monkeypatch.setattr(kernels, name, counting)
    onednn = layers.onednn_linear

    def counting_onednn(*args):
        calls["onednn"] += 1
        return onednn(*args)

    monkeypatch.setattr(layers, "onednn_linear", counting_onednn)

    torch.manual_seed(0)
    for n_in, n_out in [(64, 192), (192, 64)]:
        layer = Linear(n_in, n_out, bias=True)
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
        x = torch.randn(100, n_in)
        with torch.inference_mode():
            expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
            for num_tokens in (1, 7, 64, 100):
                torch.testing.assert_close(
                    layer(x[:num_tokens]), expected[:num_tokens], rtol=1e-5, atol=1e-4
                )
    if kernels is not None:  # gemv for the two single-token calls, the small GEMM at 7 and 64
        assert calls == {"gemv": 2, "gemm_small": 4, "onednn": 0}
    else:  # oneDNN for 7 and 64 tokens of the widening layer only
        assert calls["onednn"] == (2 if layers._HAS_ONEDNN else 0)


@needs_kernels
@pytest.mark.parametrize("num_tokens, n_out, n_in", [(2, 576, 576), (3, 7, 8), (5, 13, 16),
                                                     (64, 960, 576), (33, 5, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_small_matches_torch_linear(num_tokens, n_out, n_in, bias):
    torch.manual_seed(num_tokens * n_out)
    weight, x = torch.randn(n_out, n_in), torch.randn(num_tokens, n_in)
    b = torch.randn(n_out) if bias else None
    got = kernels.gemm_small(x, weight, b)
    assert got.shape == (num_tokens, n_out)
    expected = torch.nn.functional.linear(x, weight, b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * n_in**0.5)


@needs_kernels
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 4, 16), (8, 1, 24), (2, 2, 12)])
def test_decode_attention_matches_sdpa_path(monkeypatch, num_heads, num_kv_heads, head_dim):
    torch.manual_seed(num_heads * head_dim)
    block_size, num_blocks = 16, 40
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    context_lens = [1, 3, 16, 17, 45, 100]
    perm = torch.randperm(num_blocks).tolist()
    tables, next_block = [], 0
    for n in context_lens:
        count = -(-n // block_size)
        tables.append(perm[next_block : next_block + count])
        next_block += count
    meta = AttentionMetadata.build([1] * len(context_lens), context_lens, tables, block_size, torch.device("cpu"))
    q = torch.randn(len(context_lens), num_heads, head_dim)
    k = torch.randn(len(context_lens), num_kv_heads, head_dim)
    v = torch.randn(len(context_lens), num_kv_heads, head_dim)
    got = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    monkeypatch.setattr(attention, "_cpu_kernels", lambda q, k_cache: None)
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_mixed_batch_uses_the_kernel_for_its_decodes(monkeypatch):
    torch.manual_seed(1)
    block_size = 16
    k_cache = torch.randn(10, block_size, 2, 32)
    v_cache = torch.randn(10, block_size, 2, 32)
    meta = AttentionMetadata.build([1, 1, 5], [20, 7, 5], [[3, 4], [0], [9]], block_size, torch.device("cpu"))
    q, k, v = torch.randn(7, 4, 32), torch.randn(7, 2, 32), torch.randn(7, 2, 32)
    got = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    monkeypatch.setattr(attention, "_cpu_kernels", lambda q, k_cache: None)
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_failed_build_raises_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.raises(subprocess.CalledProcessError):
        cpu_kernels.build(tmp_path)
    assert not any(tmp_path.rglob("*.so"))


@needs_kernels
def test_build_is_cached_by_source_and_flags(tmp_path):
    first = cpu_kernels.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("num_tokens, dim", [(1, 576), (5, 13), (3, 8)])
def test_add_rms_norm_matches_torch(monkeypatch, num_tokens, dim):
    from engine.models import layers
    from engine.models.layers import RMSNorm

    torch.manual_seed(dim)
    norm = RMSNorm(dim, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(num_tokens, dim), torch.randn(num_tokens, dim)
    with torch.inference_mode():
        plain = norm(x)
        out, new_residual = norm(x, residual.clone())
        monkeypatch.setattr(layers.cpu_kernels, "load", lambda: None)
        expected_plain = norm(x)
        expected_out, expected_residual = norm(x, residual.clone())
    torch.testing.assert_close(plain, expected_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_residual, expected_residual)  # the same float32 add
    assert torch.equal(new_residual, x + residual)
