"""Prefill side: push one request's KV to a decode worker over KVTransfer.Push.

Layer by layer, in the order the engine computes them, each layer's token range cut into chunks of
about chunk_bytes. From a KVStream (engine/kv_stream.py), layer l of a forward pass is sent while
the engine computes layer l + 1, and with chunked prefill, chunk c while it computes chunk c + 1:
the transfer hides under the prefill. From K/V already computed (read_kv), the same chunks follow
one another at once. An empty last chunk carries the first token, sampled after the last layer;
when the decode worker already holds every token it is the only chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc
import torch

from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from kvtransfer.codec import KVGeometry, chunk_num_bytes, encode_chunk

log = logging.getLogger(__name__)

# read_kv(layer_start, layer_end, token_start, token_end) -> (k, v), [layers, tokens, heads, dim]
ReadKV = Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]

DEFAULT_CHUNK_BYTES = 1 << 20


class KVSource(Protocol):
    """Where the chunks' K/V come from: engine.kv_stream.KVStream, or ComputedKV."""

    def wait(self, layer: int, num_tokens_seen: int, timeout: float) -> int:
        """Positions of `layer` available, once more than num_tokens_seen are."""

    def read(self, layer: int, token_start: int, token_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of one layer's positions [token_start, token_end): [1, tokens, heads, dim]."""


class ComputedKV:
    """A request's K/V already computed up to token_end, read with read_kv."""

    def __init__(self, read_kv: ReadKV, token_end: int) -> None:
        self._read_kv, self._token_end = read_kv, token_end

    def wait(self, layer: int, num_tokens_seen: int, timeout: float) -> int:
        return self._token_end

    def read(self, layer: int, token_start: int, token_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._read_kv(layer, layer + 1, token_start, token_end)


def iter_chunks(
    *,
    transfer_id: str,
    attempt: int,
    geometry: KVGeometry,
    token_start: int,
    token_end: int,
    read_kv: ReadKV | None = None,
    stream: KVSource | None = None,
    first_token_id: int | Callable[[], int],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compression: str = "none",  # compression.COMPRESSIONS; the empty last chunk is sent as is
    wait_timeout_s: float = 60.0,
) -> Iterator[kvtransfer_pb2.KVChunk]:
    """The chunks of positions [token_start, token_end) of every layer, from read_kv (computed
    already) or from a stream (as computed: each wait at most wait_timeout_s), then the last chunk
    with first_token_id (or what first_token_id() returns once the layers are sent)."""
    if (read_kv is None) == (stream is None):
        raise ValueError("give exactly one of read_kv and stream")
    source = stream if stream is not None else ComputedKV(read_kv, token_end)
    tokens_per_chunk = max(1, chunk_bytes // geometry.bytes_per_token_layer)
    num_sent = [token_start] * geometry.num_layers  # per layer: positions sent (or not needed)
    while min(num_sent) < token_end:
        for layer in range(geometry.num_layers):
            if num_sent[layer] >= token_end:
                continue
            ready = min(source.wait(layer, num_sent[layer], wait_timeout_s), token_end)
            for start in range(num_sent[layer], ready, tokens_per_chunk):
                end = min(start + tokens_per_chunk, ready)
                k, v = source.read(layer, start, end)
                yield encode_chunk(transfer_id, attempt, layer, start, k, v,
                                   compression=compression)
            num_sent[layer] = max(num_sent[layer], ready)
    first = first_token_id() if callable(first_token_id) else first_token_id
    empty = torch.empty(0, 0, geometry.num_kv_heads, geometry.head_dim, dtype=geometry.dtype)
    # An empty chunk names no range; the receiver accepts it only as the last one.
    yield encode_chunk(transfer_id, attempt, 0, token_start, empty, empty, last=True,
                       first_token_id=first)


def push_kv(
    channel: grpc.Channel,
    chunks: Iterator[kvtransfer_pb2.KVChunk],
    *,
    timeout: float,
    on_chunk: Callable[[int], None] | None = None,
    cancel_with: grpc.RpcContext | None = None,
) -> int:
    """Stream chunks to the decode worker; return the KV bytes sent (payloads and scales).
    Raises grpc.RpcError (code CANCELLED when cancel_with ended first). cancel_with: an RPC (the
    Prefill call being served) whose end cancels the push, so a prefill the router gave up on
    stops sending."""
    num_bytes = 0

    def counted() -> Iterator[kvtransfer_pb2.KVChunk]:
        nonlocal num_bytes
        for chunk in chunks:
            num_bytes += chunk_num_bytes(chunk)
            if on_chunk is not None:
                on_chunk(chunk_num_bytes(chunk))
            yield chunk

    call = kvtransfer_pb2_grpc.KVTransferStub(channel).Push.future(counted(), timeout=timeout)
    if cancel_with is not None and not cancel_with.add_callback(call.cancel):
        call.cancel()  # that RPC has ended already
    try:
        call.result()
    except grpc.FutureCancelledError:
        raise call from None  # the call is also the RpcError, with code CANCELLED
    return num_bytes
