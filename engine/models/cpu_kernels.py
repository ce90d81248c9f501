"""The decode kernels of cpu_kernels.c: built on first use, loaded with ctypes.

`load()` returns a CpuKernels, or None where the kernels cannot run here (not x86-64, no AVX2/FMA,
no C compiler, a failed build); callers then use torch's own operators. The shared library is
cached under ~/.cache/baton/kernels/, keyed by the source and the flags, and written atomically, so
several worker processes can build it at once. It links the OpenMP runtime torch has already loaded,
so both share one thread pool; each call uses torch.get_num_threads() threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
CACHE_DIR = Path.home() / ".cache" / "baton" / "kernels"

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def cpu_supports_avx2_fma() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        return False
    return "avx2" in flags and "fma" in flags


def build(cache_dir: Path = CACHE_DIR) -> Path:
    """Compile cpu_kernels.c into cache_dir (once per source and flags); returns the library."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    library = cache_dir / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        partial = Path(tmp) / library.name
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
            check=True, capture_output=True, text=True,
        )
        os.replace(partial, library)  # atomic; a concurrent builder's copy is identical
    logger.info("built the CPU decode kernels: %s", library)
    return library


class DecoderLayerWeights(ctypes.Structure):
    """BatonDecoderLayer in cpu_kernels.c: one decoder layer's weights (biases may be NULL) and
    its KV pool. Build it with CpuKernels.decoder_layer; it holds pointers, not the tensors."""

    _fields_ = [(name, _ptr) for name in (
        "input_norm", "qkv_weight", "qkv_bias", "o_weight", "o_bias", "post_norm",
        "gate_up_weight", "down_weight", "k_cache", "v_cache",
    )]


class DecodeBatch(ctypes.Structure):
    """BatonDecodeBatch in cpu_kernels.c: sequences with one new token each, and the scratch a
    layer writes. Build it with CpuKernels.decode_batch, which keeps the tensors alive with it."""

    _fields_ = [
        *[(name, _i64) for name in ("num_seqs", "dim", "num_heads", "num_kv_heads", "head_dim",
                                     "intermediate", "block_size", "max_blocks")],
        ("eps", ctypes.c_float), ("scale", ctypes.c_float),
        *[(name, _ptr) for name in ("cos", "sin", "slots", "block_tables", "context_lens",
                                     "normed", "qkv", "attn", "gate_up")],
    ]


def _ptr_or_none(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))
        self._gemv = lib.baton_gemv_f32
        self._gemv.argtypes = [_ptr] * 4 + [_i64, _i64, ctypes.c_int]
        self._gemv.restype = None
        self._attention = lib.baton_decode_attention_f32
        self._attention.argtypes = [_ptr] * 6 + [_i64] * 6 + [ctypes.c_float, ctypes.c_int]
        self._attention.restype = ctypes.c_int
        self._gemm_small = lib.baton_gemm_small_f32
        self._gemm_small.argtypes = [_ptr] * 4 + [_i64, _i64, _i64, ctypes.c_int]
        self._gemm_small.restype = None
        self._add_rms_norm = lib.baton_add_rms_norm_f32
        self._add_rms_norm.argtypes = [_ptr] * 4 + [_i64, _i64, ctypes.c_float, ctypes.c_int]
        self._add_rms_norm.restype = None
        self._store_kv = lib.baton_store_kv_f32
        self._store_kv.argtypes = [_ptr] * 5 + [_i64, _i64]
        self._store_kv.restype = None
        self._decode_layer = lib.baton_decode_layer_f32
        self._decode_layer.argtypes = [_ptr, _ptr, _ptr, ctypes.c_int]
        self._decode_layer.restype = ctypes.c_int

    def gemv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [1, in], weight [out, in] contiguous, bias [out] or None (float32, CPU) -> [1, out]."""
        x = x.contiguous()
        y = torch.empty(1, weight.shape[0], dtype=torch.float32)
        self._gemv(
            weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), weight.shape[0], weight.shape[1], torch.get_num_threads(),
        )
        return y

    def gemm_small(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [M, K] (a few tokens), weight [N, K] contiguous, K % 8 == 0, bias [N] or None
        (float32, CPU) -> [M, N]."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
        self._gemm_small(
            x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), x.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads(),
        )
        return y

    def add_rms_norm(
        self,
        x: torch.Tensor,  # [T, dim], added into residual when residual is given
        residual: torch.Tensor | None,  # [T, dim] contiguous, updated in place
        weight: torch.Tensor,  # [dim]
        eps: float,
    ) -> torch.Tensor:
        """RMSNorm(x), or: residual += x in place, then RMSNorm(residual). Returns [T, dim]."""
        if residual is None:  # normalize x; the kernel writes nothing back when delta is NULL
            residual, x = x.contiguous(), None
        elif not residual.is_contiguous():
            raise ValueError("residual must be contiguous: it is updated in place")
        else:
            x = x.contiguous()
        out = torch.empty_like(residual)
        self._add_rms_norm(
            residual.data_ptr(), None if x is None else x.data_ptr(), weight.data_ptr(),
            out.data_ptr(), residual.shape[0], residual.shape[1], eps, torch.get_num_threads(),
        )
        return out

    def store_kv(
        self,
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] contiguous
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T] int64
    ) -> None:
        k, v, slots = k.contiguous(), v.contiguous(), slot_mapping.contiguous()
        self._store_kv(
            k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
            k.shape[0], k.shape[1] * k.shape[2],
        )

    def decode_attention(
        self,
        q: torch.Tensor,  # [B, H, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [B, max_blocks] int64
        context_lens: torch.Tensor,  # [B] int64, >= 1
        scale: float,
    ) -> torch.Tensor:
        """One query token per sequence over its paged context -> [B, H, D]."""
        q = q.contiguous()
        block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
        num_seqs, num_heads, head_dim = q.shape
        out = torch.empty_like(q)
        status = self._attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
            context_lens.data_ptr(), out.data_ptr(), num_seqs, num_heads, k_cache.shape[2],
            head_dim, k_cache.shape[1], block_tables.shape[1], scale, torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("decode attention: out of memory for the attention scores")
        return out


    @staticmethod
    def decoder_layer(
        input_norm: torch.Tensor,  # [dim]
        qkv_weight: torch.Tensor,  # [(H + 2 Hkv) D, dim], q rows, then k, then v
        qkv_bias: torch.Tensor | None,
        o_weight: torch.Tensor,  # [dim, H D]
        o_bias: torch.Tensor | None,
        post_norm: torch.Tensor,  # [dim]
        gate_up_weight: torch.Tensor,  # [2 intermediate, dim], gate rows, then up
        down_weight: torch.Tensor,  # [dim, intermediate]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
    ) -> DecoderLayerWeights:
        """Pointers to one layer's tensors (contiguous float32 on the CPU, alive while used)."""
        tensors = (input_norm, qkv_weight, qkv_bias, o_weight, o_bias, post_norm, gate_up_weight,
                   down_weight, k_cache, v_cache)
        if not all(t is None or t.is_contiguous() for t in tensors):
            raise ValueError("decoder layer tensors must be contiguous")
        return DecoderLayerWeights(*map(_ptr_or_none, tensors))

    @staticmethod
    def decode_batch(
        *,
        dim: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int, eps: float,
        cos: torch.Tensor,  # [B, 1, head_dim] as rope_cos_sin returns them
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,  # [B] int64
        block_tables: torch.Tensor,  # [B, max_blocks] int64
        context_lens: torch.Tensor,  # [B] int64, >= 1
        block_size: int,
    ) -> tuple[DecodeBatch, tuple[torch.Tensor, ...]]:
        """The batch and the tensors it points into (keep them while the batch is used)."""
        num_seqs = slot_mapping.shape[0]
        width = (num_heads + 2 * num_kv_heads) * head_dim
        keep = (
            cos.contiguous(), sin.contiguous(), slot_mapping.contiguous(),
            block_tables.contiguous(), context_lens.contiguous(),
            torch.empty(num_seqs, dim), torch.empty(num_seqs, width),
            torch.empty(num_seqs, num_heads * head_dim), torch.empty(num_seqs, 2 * intermediate),
        )
        batch = DecodeBatch(
            num_seqs, dim, num_heads, num_kv_heads, head_dim, intermediate, block_size,
            block_tables.shape[1], eps, head_dim**-0.5, *(t.data_ptr() for t in keep),
        )
        return batch, keep

    def decode_layer(
        self, layer: DecoderLayerWeights, batch: DecodeBatch, residual: torch.Tensor
    ) -> None:
        """residual [B, dim] (contiguous) += one decoder layer's attention and MLP outputs, for
        sequences with one new token each; their K/V go into the layer's pool."""
        status = self._decode_layer(
            ctypes.byref(layer), ctypes.byref(batch), residual.data_ptr(), torch.get_num_threads()
        )
        if status != 0:
            raise MemoryError("decode layer: out of memory for the attention scores")


@functools.cache
def load() -> CpuKernels | None:
    if not cpu_supports_avx2_fma():
        logger.info("CPU decode kernels not used: this CPU lacks AVX2/FMA")
        return None
    try:
        return CpuKernels(build())
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("CPU decode kernels not used (torch's operators instead): %s", detail)
        return None
