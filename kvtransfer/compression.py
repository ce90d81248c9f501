"""The names of the KV wire compressions and the check of a sender's settings; torch-free, so the
cluster config can validate them without loading torch.

"none": K/V travel in the KV dtype as they are. "int8": int8 values with one float32 scale per
group of scale_block_tokens tokens and KV head (kvtransfer/quant.py): about a quarter of float32's
bytes, half of bfloat16's, and lossy.
"""

from __future__ import annotations

COMPRESSIONS = ("none", "int8")
DEFAULT_SCALE_BLOCK_TOKENS = 16  # the engine's default block size


def check_compression(compression: str, scale_block_tokens: int = DEFAULT_SCALE_BLOCK_TOKENS) -> None:
    """Raise ValueError naming the parameter unless the sender's settings are valid."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if scale_block_tokens < 1:
        raise ValueError(f"scale_block_tokens must be >= 1, got {scale_block_tokens}")
