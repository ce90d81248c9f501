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
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
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
