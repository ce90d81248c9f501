"""Prefill side: push one request's KV to a decode worker over KVTransfer.Push.

Layer by layer, in the order the engine computes them, each layer's token range cut into chunks of
about chunk_bytes: sent in the Push stream (iter_chunks), or, when the decode worker is on this
host, through a shared-memory ring that the stream only names (iter_ring_push; kvtransfer/shm.py).
From a KVStream (engine/kv_stream.py), layer l of a forward pass is sent while the engine computes
layer l + 1, and with chunked prefill, chunk c while it computes chunk c + 1: the transfer hides
under the prefill. From K/V already computed (read_kv), the same chunks follow one another at once. An empty last chunk carries the first token, sampled after the last layer;
when the decode worker already holds every token it is the only chunk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc
import torch

from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from kvtransfer.codec import KVGeometry, chunk_header, chunk_num_bytes, encode_chunk
from kvtransfer.shm import Ring

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


# (layer, token_start, k, v): k, v [1, tokens, num_kv_heads, head_dim]
KVPiece = tuple[int, int, torch.Tensor, torch.Tensor]


def iter_pieces(
    *,
    geometry: KVGeometry,
    token_start: int,
    token_end: int,
    read_kv: ReadKV | None = None,
    stream: KVSource | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    wait_timeout_s: float = 60.0,
) -> Iterator[KVPiece]:
    """Positions [token_start, token_end) of every layer in pieces of at most chunk_bytes (one
    token at least), from read_kv (computed already) or from a stream (as computed: each wait at
    most wait_timeout_s), in the order the layers become available."""
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
                yield (layer, start, *source.read(layer, start, end))
            num_sent[layer] = max(num_sent[layer], ready)


def _last_chunk(
    transfer_id: str, attempt: int, geometry: KVGeometry, token_start: int, first_token_id: int
) -> kvtransfer_pb2.KVChunk:
    """The empty last chunk with the first token. It names no range; the receiver accepts it
    only as the last one."""
    empty = torch.empty(0, 0, geometry.num_kv_heads, geometry.head_dim, dtype=geometry.dtype)
    return encode_chunk(transfer_id, attempt, 0, token_start, empty, empty, last=True,
                        first_token_id=first_token_id)


def _first(first_token_id: int | Callable[[], int]) -> int:
    return first_token_id() if callable(first_token_id) else first_token_id


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
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[kvtransfer_pb2.KVChunk]:
    """The chunks of iter_pieces() (the same arguments), then the last chunk with first_token_id
    (or what first_token_id() returns once the layers are sent). on_bytes(n) counts each chunk's
    KV bytes (payload and scales) as it is handed on."""
    for layer, start, k, v in iter_pieces(
            geometry=geometry, token_start=token_start, token_end=token_end, read_kv=read_kv,
            stream=stream, chunk_bytes=chunk_bytes, wait_timeout_s=wait_timeout_s):
        chunk = encode_chunk(transfer_id, attempt, layer, start, k, v, compression=compression)
        if on_bytes is not None:
            on_bytes(chunk_num_bytes(chunk))
        yield chunk
    yield _last_chunk(transfer_id, attempt, geometry, token_start, _first(first_token_id))


def iter_ring_push(
    ring: Ring,
    *,
    transfer_id: str,
    attempt: int,
    geometry: KVGeometry,
    token_start: int,
    token_end: int,
    read_kv: ReadKV | None = None,
    stream: KVSource | None = None,
    first_token_id: int | Callable[[], int],
    timeout_s: float,
    call_done: threading.Event,
    wait_timeout_s: float = 60.0,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[kvtransfer_pb2.KVChunk]:
    """A push through a shared-memory ring (kvtransfer/shm.py): passes iter_pieces() (pieces of
    the ring's slot size, uncompressed) and the last chunk through the ring, each slot waited for
    until timeout_s from the start, and yields the one message of the Push stream, which names the
    ring, once the first chunk is in it (so the receiver never waits on a prefill still queued).
    Raises shm.RingError when the receiver fails the transfer or call_done is set (push_kv's
    `done`: the Push call ended)."""
    deadline = time.monotonic() + timeout_s
    ring.reset()
    announcement = kvtransfer_pb2.KVChunk(transfer_id=transfer_id, attempt=attempt, ring=ring.name)
    seq, finished = 0, False
    try:
        for layer, start, k, v in iter_pieces(
                geometry=geometry, token_start=token_start, token_end=token_end, read_kv=read_kv,
                stream=stream, chunk_bytes=ring.slot_bytes, wait_timeout_s=wait_timeout_s):
            header = chunk_header(transfer_id, attempt, layer, start, k)
            num_bytes = ring.write(seq, header, (k, v), deadline, call_done)
            if on_bytes is not None:
                on_bytes(num_bytes)
            seq += 1
            if seq == 1:
                yield announcement
        last = _last_chunk(transfer_id, attempt, geometry, token_start, _first(first_token_id))
        ring.write(seq, last, (), deadline, call_done)
        finished = True
        if seq == 0:  # the decode worker holds every token: the last chunk is the only one
            yield announcement
    finally:
        if not finished:  # the receiver fails the transfer instead of waiting for its lease
            ring.stop()


def push_kv(
    channel: grpc.Channel,
    chunks: Iterator[kvtransfer_pb2.KVChunk],
    *,
    timeout: float,
    cancel_with: grpc.RpcContext | None = None,
    done: threading.Event | None = None,
) -> None:
    """Stream chunks (iter_chunks, or iter_ring_push's one message) to the decode worker and wait
    for its acknowledgement. Raises grpc.RpcError (code CANCELLED when cancel_with ended first).
    cancel_with: an RPC (the Prefill call being served) whose end cancels the push, so a prefill
    the router gave up on stops sending. done is set when the call ends, however it ends."""
    call = kvtransfer_pb2_grpc.KVTransferStub(channel).Push.future(chunks, timeout=timeout)
    if done is not None:
        call.add_done_callback(lambda _call: done.set())
    if cancel_with is not None and not cancel_with.add_callback(call.cancel):
        call.cancel()  # that RPC has ended already
    try:
        call.result()
    except grpc.FutureCancelledError:
        raise call from None  # the call is also the RpcError, with code CANCELLED
