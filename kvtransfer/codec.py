"""KV chunks: a layer range x a token range of one request's K and V, as one protobuf message.

Payload layout: K then V, each [layers, tokens, num_kv_heads, head_dim], row-major, in the
sender's KV dtype; crc32 over the payload. decode_chunk() checks every header field against what
the receiver expects before it builds a tensor, so a bad chunk never reaches the KV pool.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass

import torch

from baton.v1 import kvtransfer_pb2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class ChunkErrorReason(enum.Enum):
    UNKNOWN_TRANSFER = "unknown_transfer"
    STALE_ATTEMPT = "stale_attempt"
    BAD_RANGE = "bad_range"
    BAD_SHAPE = "bad_shape"
    CHECKSUM = "checksum"
    INCOMPLETE = "incomplete"
    EXPIRED = "expired"


class ChunkError(ValueError):
    def __init__(self, reason: ChunkErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class KVGeometry:
    """The shape of one token's KV on a worker; sender and receiver must agree."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token_layer(self) -> int:
        # K and V
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.bytes_per_token_layer


def encode_chunk(
    transfer_id: str,
    attempt: int,
    layer_start: int,
    token_start: int,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    last: bool = False,
    first_token_id: int = 0,
) -> kvtransfer_pb2.KVChunk:
    """k, v: [layers, tokens, num_kv_heads, head_dim], same dtype."""
    assert k.shape == v.shape and k.dtype == v.dtype, (k.shape, v.shape, k.dtype, v.dtype)
    num_layers, num_tokens, num_kv_heads, head_dim = k.shape
    payload = _to_bytes(k) + _to_bytes(v)
    return kvtransfer_pb2.KVChunk(
        transfer_id=transfer_id,
        attempt=attempt,
        layer_start=layer_start,
        layer_end=layer_start + num_layers,
        token_start=token_start,
        token_end=token_start + num_tokens,
        dtype=DTYPE_NAMES[k.dtype],
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        payload=payload,
        crc32=zlib.crc32(payload),
        last=last,
        first_token_id=first_token_id,
    )


def decode_chunk(
    chunk: kvtransfer_pb2.KVChunk, geometry: KVGeometry, token_start: int, token_end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate chunk against geometry and the allowed token range [token_start, token_end);
    return (k, v), each [layers, tokens, num_kv_heads, head_dim]."""
    if not (0 <= chunk.layer_start < chunk.layer_end <= geometry.num_layers):
        raise ChunkError(
            ChunkErrorReason.BAD_RANGE,
            f"layers [{chunk.layer_start}, {chunk.layer_end}) outside [0, {geometry.num_layers})",
        )
    if not (token_start <= chunk.token_start < chunk.token_end <= token_end):
        raise ChunkError(
            ChunkErrorReason.BAD_RANGE,
            f"tokens [{chunk.token_start}, {chunk.token_end}) outside [{token_start}, {token_end})",
        )
    dtype = DTYPES.get(chunk.dtype)
    if (
        dtype is None
        or chunk.num_kv_heads != geometry.num_kv_heads
        or chunk.head_dim != geometry.head_dim
    ):
        raise ChunkError(
            ChunkErrorReason.BAD_SHAPE,
            f"chunk is {chunk.dtype} heads={chunk.num_kv_heads} head_dim={chunk.head_dim}, "
            f"expected heads={geometry.num_kv_heads} head_dim={geometry.head_dim}",
        )
    num_layers = chunk.layer_end - chunk.layer_start
    num_tokens = chunk.token_end - chunk.token_start
    expected = 2 * num_layers * num_tokens * geometry.num_kv_heads * geometry.head_dim * dtype.itemsize
    if len(chunk.payload) != expected:
        raise ChunkError(
            ChunkErrorReason.BAD_SHAPE,
            f"payload has {len(chunk.payload)} bytes, its header implies {expected}",
        )
    if zlib.crc32(chunk.payload) != chunk.crc32:
        raise ChunkError(ChunkErrorReason.CHECKSUM, "payload checksum mismatch")
    flat = torch.frombuffer(bytearray(chunk.payload), dtype=torch.uint8).view(dtype)
    kv = flat.view(2, num_layers, num_tokens, geometry.num_kv_heads, geometry.head_dim)
    return kv[0], kv[1]


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
