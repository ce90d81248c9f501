"""KV chunks: a layer range x a token range of one request's K and V, as one protobuf message.

Payload layout: K then V, each [layers, tokens, num_kv_heads, head_dim], row-major, in the
sender's KV dtype (compression "none", the default) or as int8 (compression "int8", with float32
scales [2 (K, V), layers, groups, num_kv_heads] per scale_block_tokens tokens; kvtransfer/quant.py).
CRC-32C covers the payload then the scales: everything that is dequantized. decode_chunk() checks
every header field and both lengths against what the receiver expects before it builds a tensor,
so a bad chunk never reaches the KV pool.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from crc32c import crc32c  # in hardware (SSE 4.2, ARMv8 CRC): ~20 GB/s

from baton.v1 import kvtransfer_pb2
from kvtransfer.compression import COMPRESSIONS, DEFAULT_SCALE_BLOCK_TOKENS, check_compression
from kvtransfer.quant import dequantize_int8, num_groups, quantize_int8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_SCALE_DTYPE = torch.float32


class ChunkErrorReason(enum.Enum):
    UNKNOWN_TRANSFER = "unknown_transfer"
    STALE_ATTEMPT = "stale_attempt"
    BAD_RANGE = "bad_range"
    BAD_SHAPE = "bad_shape"
    BAD_COMPRESSION = "bad_compression"  # an unknown compression, or bad scale parameters
    CHECKSUM = "checksum"
    INCOMPLETE = "incomplete"
    EXPIRED = "expired"
    RING_UNAVAILABLE = "ring_unavailable"  # the sender's shared-memory ring cannot be opened here


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


def chunk_num_bytes(chunk: kvtransfer_pb2.KVChunk) -> int:
    """The KV bytes a chunk carries: payload and scales."""
    return len(chunk.payload) + len(chunk.scales)


def chunk_header(
    transfer_id: str,
    attempt: int,
    layer_start: int,
    token_start: int,
    k: torch.Tensor,
    *,
    last: bool = False,
    first_token_id: int = 0,
) -> kvtransfer_pb2.KVChunk:
    """The header of a chunk of k's shape [layers, tokens, num_kv_heads, head_dim] and dtype:
    every field but payload, scales and crc32c."""
    num_layers, num_tokens, num_kv_heads, head_dim = k.shape
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
        last=last,
        first_token_id=first_token_id,
    )


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
    compression: str = "none",
    scale_block_tokens: int = DEFAULT_SCALE_BLOCK_TOKENS,
) -> kvtransfer_pb2.KVChunk:
    """k, v: [layers, tokens, num_kv_heads, head_dim], same dtype. compression "int8" sends
    int8 values with one float32 scale per scale_block_tokens tokens (from token_start) and KV
    head; "none" sends the values as they are."""
    assert k.shape == v.shape and k.dtype == v.dtype, (k.shape, v.shape, k.dtype, v.dtype)
    check_compression(compression, scale_block_tokens)
    chunk = chunk_header(transfer_id, attempt, layer_start, token_start, k, last=last,
                         first_token_id=first_token_id)
    if compression == "int8":
        (qk, k_scales), (qv, v_scales) = (quantize_int8(t, scale_block_tokens) for t in (k, v))
        chunk.compression = compression
        chunk.scale_block_tokens = scale_block_tokens
        chunk.payload = _to_bytes(qk, qv)
        chunk.scales = _to_bytes(k_scales, v_scales)
    else:
        chunk.payload = _to_bytes(k, v)
    chunk.crc32c = checksum(chunk.payload, chunk.scales)
    return chunk


def decode_chunk(
    chunk: kvtransfer_pb2.KVChunk,
    geometry: KVGeometry,
    token_start: int,
    token_end: int,
    payload: memoryview | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate chunk against geometry and the allowed token range [token_start, token_end);
    return (k, v), each [layers, tokens, num_kv_heads, head_dim] in the chunk's dtype. payload,
    if given, is the chunk's payload held elsewhere (a ring slot, kvtransfer/shm.py; uncompressed
    only): k and v are then views of it, valid while it is."""
    dtype = _check_header(chunk, geometry, token_start, token_end)
    compression = chunk.compression or "none"
    if payload is None:
        payload = chunk.payload
    elif compression != "none" or chunk.payload:
        raise ChunkError(ChunkErrorReason.BAD_COMPRESSION,
                         "a chunk passed through shared memory is uncompressed and carries no "
                         "payload of its own")
    num_layers = chunk.layer_end - chunk.layer_start
    num_tokens = chunk.token_end - chunk.token_start
    shape = (2, num_layers, num_tokens, geometry.num_kv_heads, geometry.head_dim)
    value_dtype = torch.int8 if compression == "int8" else dtype
    _check_length("payload", len(payload), shape, value_dtype)
    scales_shape = (2, num_layers, 0, geometry.num_kv_heads)
    if compression == "int8":
        groups = num_groups(num_tokens, chunk.scale_block_tokens)
        scales_shape = (2, num_layers, groups, geometry.num_kv_heads)
    _check_length("scales", len(chunk.scales), scales_shape, _SCALE_DTYPE)
    if checksum(payload, chunk.scales) != chunk.crc32c:
        raise ChunkError(ChunkErrorReason.CHECKSUM, "payload or scales checksum mismatch")
    kv = _from_bytes(payload, value_dtype, shape)  # [2, L, T, H, D]
    if compression == "none":
        return kv[0], kv[1]
    scales = _from_bytes(chunk.scales, _SCALE_DTYPE, scales_shape)  # [2, L, G, H]
    if not (torch.isfinite(scales).all() and (scales >= 0).all()):
        raise ChunkError(ChunkErrorReason.BAD_COMPRESSION, "scales must be finite and >= 0")
    k, v = (dequantize_int8(kv[i], scales[i], chunk.scale_block_tokens, dtype) for i in (0, 1))
    return k, v


def _check_header(
    chunk: kvtransfer_pb2.KVChunk, geometry: KVGeometry, token_start: int, token_end: int
) -> torch.dtype:
    """Every header field against the receiver's expectations; returns the KV dtype."""
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
            f"chunk is {chunk.dtype!r} heads={chunk.num_kv_heads} head_dim={chunk.head_dim}, "
            f"expected one of {', '.join(DTYPES)} with heads={geometry.num_kv_heads} "
            f"head_dim={geometry.head_dim}",
        )
    compression = chunk.compression or "none"
    if compression not in COMPRESSIONS:
        raise ChunkError(
            ChunkErrorReason.BAD_COMPRESSION,
            f"compression {chunk.compression!r} is unknown; known: {', '.join(COMPRESSIONS)}",
        )
    if compression == "none" and chunk.scale_block_tokens != 0:
        raise ChunkError(ChunkErrorReason.BAD_COMPRESSION,
                         f"an uncompressed chunk has scale_block_tokens {chunk.scale_block_tokens}"
                         ", expected 0")
    if compression == "int8" and chunk.scale_block_tokens < 1:
        raise ChunkError(ChunkErrorReason.BAD_COMPRESSION,
                         f"scale_block_tokens must be >= 1, got {chunk.scale_block_tokens}")
    return dtype


def _check_length(name: str, num_bytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    expected = dtype.itemsize
    for size in shape:
        expected *= size
    if num_bytes != expected:
        raise ChunkError(ChunkErrorReason.BAD_SHAPE,
                         f"{name} has {num_bytes} bytes, its header implies {expected}")


def checksum(*parts: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of the parts back to back (a chunk's: payload then scales)."""
    value = 0
    for part in parts:
        value = crc32c(part, value)
    return value


def _to_bytes(*tensors: torch.Tensor) -> bytes:
    """The tensors' bytes back to back, copied once."""
    return b"".join(t.detach().contiguous().cpu().view(torch.uint8).numpy().data for t in tensors)


def _from_bytes(
    data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    """A tensor over data: a view of a (writable) memoryview, a copy of bytes."""
    buffer = data if isinstance(data, memoryview) else bytearray(data)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)
