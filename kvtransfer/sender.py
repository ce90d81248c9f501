"""Prefill side: push one request's KV to a decode worker over KVTransfer.Push.

Layer by layer, each layer's token range cut into chunks of about chunk_bytes. The last chunk
carries the first token. When the decode worker already holds every token (nothing to send), one
empty last chunk still delivers the first token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc
import torch

from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from kvtransfer.codec import KVGeometry, encode_chunk

log = logging.getLogger(__name__)

# read_kv(layer_start, layer_end, token_start, token_end) -> (k, v), [layers, tokens, heads, dim]
ReadKV = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]

DEFAULT_CHUNK_BYTES = 1 << 20


def iter_chunks(
    *,
    transfer_id: str,
    attempt: int,
    geometry: KVGeometry,
    token_start: int,
    token_end: int,
    read_kv: ReadKV,
    first_token_id: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[kvtransfer_pb2.KVChunk]:
    tokens_per_chunk = max(1, chunk_bytes // geometry.bytes_per_token_layer)
    pieces = [
        (layer, start, min(start + tokens_per_chunk, token_end))
        for layer in range(geometry.num_layers)
        for start in range(token_start, token_end, tokens_per_chunk)
    ]
    if not pieces:
        empty = torch.empty(0, 0, geometry.num_kv_heads, geometry.head_dim, dtype=geometry.dtype)
        # An empty chunk names no range; the receiver accepts it only as the last one.
        chunk = encode_chunk(transfer_id, attempt, 0, token_start, empty, empty, last=True,
                             first_token_id=first_token_id)
        yield chunk
        return
    layer_kv: tuple[int, torch.Tensor, torch.Tensor] | None = None
    for i, (layer, start, end) in enumerate(pieces):
        if layer_kv is None or layer_kv[0] != layer:
            k, v = read_kv(layer, layer + 1, token_start, token_end)
            layer_kv = (layer, k, v)
        _, k, v = layer_kv
        last = i == len(pieces) - 1
        yield encode_chunk(
            transfer_id, attempt, layer, start,
            k[:, start - token_start:end - token_start], v[:, start - token_start:end - token_start],
            last=last, first_token_id=first_token_id if last else 0,
        )


def push_kv(
    channel: grpc.Channel,
    chunks: Iterator[kvtransfer_pb2.KVChunk],
    *,
    timeout: float,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """Stream chunks to the decode worker; return the payload bytes sent. Raises grpc.RpcError."""
    num_bytes = 0

    def counted() -> Iterator[kvtransfer_pb2.KVChunk]:
        nonlocal num_bytes
        for chunk in chunks:
            num_bytes += len(chunk.payload)
            if on_chunk is not None:
                on_chunk(len(chunk.payload))
            yield chunk

    stub = kvtransfer_pb2_grpc.KVTransferStub(channel)
    stub.Push(counted(), timeout=timeout)
    return num_bytes
