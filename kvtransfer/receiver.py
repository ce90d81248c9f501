"""Decode side: the KVTransfer service and the table of expected transfers with their leases.

Lifecycle of a transfer: expect() when the decode worker reserves blocks for a remote prefill ->
chunks arrive through Push (in the stream, or through the sender's shared-memory ring that the
stream's one message names: kvtransfer/shm.py), each validated and then written -> the last chunk
completes it (on_complete with the first token) -> removed. It fails (on_failed, and the stream
gets an error status) on any bad chunk, a stream (or ring) that ends early, or when its lease runs
out before completion; cancel_request() removes it without a callback (the request was aborted).
The receiver writes only through the callbacks it is given, so it knows nothing of the engine.

Invariant: a transfer leaves the table exactly once, as completed, failed or cancelled. A Push that
ends with an error status either failed its transfer or was refused on its own (its chunks name a
transfer no longer expected or an older attempt, or the transfer had already ended); the metric
hooks (on_bytes, on_seconds, on_failure, on_refusal) count each of those once and change nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from kvtransfer.codec import (
    ChunkError,
    ChunkErrorReason,
    KVGeometry,
    chunk_num_bytes,
    decode_chunk,
)
from kvtransfer.shm import Ring, RingError, RingMaps

log = logging.getLogger(__name__)

# write(request_id, layer_start, layer_end, token_start, token_end, k, v)
WriteKV = Callable[[str, int, int, int, int, torch.Tensor, torch.Tensor], None]

# Reasons that refuse one Push stream and leave its transfer as it is.
_STREAM_ONLY = {
    ChunkErrorReason.UNKNOWN_TRANSFER: grpc.StatusCode.NOT_FOUND,
    ChunkErrorReason.STALE_ATTEMPT: grpc.StatusCode.FAILED_PRECONDITION,
    ChunkErrorReason.RING_UNAVAILABLE: grpc.StatusCode.FAILED_PRECONDITION,
}
# The reasons on_failure can report, and those on_refusal reports for a stream refused on its own
# (on_refusal may also see a failure reason, when the transfer had already ended).
FAILURE_REASONS = tuple(r for r in ChunkErrorReason if r not in _STREAM_ONLY)
REFUSAL_REASONS = tuple(_STREAM_ONLY)


def _ignore(_value: object) -> None:
    pass


class _SenderGone(Exception):
    """The Push call ended while its ring was waited on (the sender went away)."""


@dataclass
class Transfer:
    transfer_id: str
    request_id: str
    token_start: int  # tokens the decode worker already holds are not sent
    token_end: int  # the prompt length
    deadline: float
    expected_at: float  # time.monotonic() at expect(): transfer time counts from the reservation
    attempt: int = -1  # the attempt whose chunks are being accepted; -1 before the first chunk
    next_token: list[int] = field(default_factory=list)  # per layer: the next expected position

    def reset(self, attempt: int, num_layers: int) -> None:
        self.attempt = attempt
        self.next_token = [self.token_start] * num_layers

    @property
    def complete(self) -> bool:
        return all(t == self.token_end for t in self.next_token)


class KVReceiver(kvtransfer_pb2_grpc.KVTransferServicer):
    def __init__(
        self,
        geometry: KVGeometry,
        *,
        write: WriteKV,
        on_complete: Callable[[str, int], None],
        on_failed: Callable[[str, ChunkError], None],
        on_bytes: Callable[[int], None] = _ignore,
        on_seconds: Callable[[float], None] = _ignore,
        on_failure: Callable[[ChunkErrorReason], None] = _ignore,
        on_refusal: Callable[[ChunkErrorReason], None] = _ignore,
        lease_s: float = 30.0,
        vocab_size: int | None = None,
    ) -> None:
        """write, on_complete and on_failed act on the request; a last chunk whose first token
        is outside [0, vocab_size) fails the transfer before on_complete. The metric hooks only count:
        on_bytes(KV bytes written: payload and scales), on_seconds(expect() to the last chunk
        written, once per completed transfer), on_failure(reason, once per failed transfer),
        on_refusal(reason, once per Push refused without failing a transfer)."""
        self.geometry = geometry
        self._write = write
        self._on_complete = on_complete
        self._on_failed = on_failed
        self._on_bytes = on_bytes
        self._on_seconds = on_seconds
        self._on_failure = on_failure
        self._on_refusal = on_refusal
        self.lease_s = lease_s
        self.vocab_size = vocab_size
        self._transfers: dict[str, Transfer] = {}
        self._rings = RingMaps()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="kv-lease-reaper", daemon=True)
        self._reaper.start()

    def expect(self, transfer_id: str, request_id: str, token_start: int, token_end: int) -> None:
        with self._lock:
            if transfer_id in self._transfers:
                raise ValueError(f"transfer {transfer_id} is already expected")
            now = time.monotonic()
            self._transfers[transfer_id] = Transfer(
                transfer_id, request_id, token_start, token_end,
                deadline=now + self.lease_s, expected_at=now,
                next_token=[token_start] * self.geometry.num_layers,
            )

    def cancel_request(self, request_id: str) -> bool:
        """Forget request_id's transfer, if any (the request was aborted); no callback."""
        with self._lock:
            ids = [t.transfer_id for t in self._transfers.values() if t.request_id == request_id]
            for transfer_id in ids:
                del self._transfers[transfer_id]
        return bool(ids)

    def close(self) -> None:
        self._stop.set()
        self._rings.close()

    # -- the service ------------------------------------------------------------------------

    def Push(self, request_iterator: Iterator[kvtransfer_pb2.KVChunk], context: grpc.ServicerContext):
        transfer: Transfer | None = None
        ring: Ring | None = None
        num_bytes = 0
        try:
            first = next(request_iterator, None)
            if first is not None and first.ring:
                transfer = self._lookup(first.transfer_id)
                ring = self._open_ring(first.ring)
                incoming = self._ring_chunks(ring, first, context)
            else:
                chunks = request_iterator if first is None else itertools.chain([first],
                                                                                request_iterator)
                incoming = ((chunk, None) for chunk in chunks)
            for seq, (chunk, payload) in enumerate(incoming):
                transfer = self._lookup(chunk.transfer_id)
                num_bytes += self._accept(transfer, chunk, payload)
                if ring is not None:
                    ring.release(seq)  # written into the pool: the slot is free again
                if chunk.last:
                    self._complete(transfer, chunk.first_token_id)
                    ring = None
                    return kvtransfer_pb2.PushAck(num_bytes=num_bytes)
            raise ChunkError(ChunkErrorReason.INCOMPLETE, "the stream ended without its last chunk")
        except ChunkError as err:
            # An unknown transfer, a stale attempt's late chunk or a ring that cannot be opened
            # refuses this stream only; any other error fails the transfer, so the request ends
            # instead of waiting for its lease.
            code = _STREAM_ONLY.get(err.reason)
            failed = code is None and transfer is not None and self._fail(transfer, err)
            if not failed:
                self._on_refusal(err.reason)
            context.abort(code or grpc.StatusCode.INVALID_ARGUMENT, f"KV transfer rejected: {err}")
        except (grpc.RpcError, _SenderGone) as exc:
            # the sender went away mid-stream; the lease frees the reservation unless it retries
            log.warning("request_id=%s: KV stream broken", transfer.request_id if transfer else "?")
            if isinstance(exc, grpc.RpcError):
                raise
            return kvtransfer_pb2.PushAck(num_bytes=num_bytes)  # to a call that has ended
        finally:
            if ring is not None:  # ended without the last chunk: the sender removes the ring
                ring.fail()  # and stops at its next slot
                self._rings.forget(ring.name)

    def CheckRing(self, request: kvtransfer_pb2.RingCheck, context: grpc.ServicerContext):
        try:
            self._rings.get(request.ring)
        except RingError as exc:
            return kvtransfer_pb2.RingCheckReply(ok=False, detail=str(exc))
        return kvtransfer_pb2.RingCheckReply(ok=True)

    def _open_ring(self, name: str) -> Ring:
        try:
            return self._rings.get(name)
        except RingError as exc:
            raise ChunkError(ChunkErrorReason.RING_UNAVAILABLE, str(exc)) from None

    def _ring_chunks(
        self, ring: Ring, announced: kvtransfer_pb2.KVChunk, context: grpc.ServicerContext
    ) -> Iterator[tuple[kvtransfer_pb2.KVChunk, memoryview]]:
        """The chunks of a push through ring, with their payloads, until the caller stops. Raises
        _SenderGone when the Push call ends, ChunkError when the transfer leaves the table (its
        lease ran out, or it was aborted), the sender stops early, a slot is malformed, or a chunk
        is not of the announced transfer and attempt."""
        transfer_id = announced.transfer_id

        def alive() -> bool:
            with self._lock:
                return context.is_active() and transfer_id in self._transfers

        for seq in itertools.count():
            try:
                chunk, payload = ring.read(seq, alive, deadline=float("inf"))
            except RingError as exc:
                if not context.is_active():
                    raise _SenderGone(str(exc)) from None
                with self._lock:
                    expected = transfer_id in self._transfers
                if not expected:
                    raise ChunkError(ChunkErrorReason.UNKNOWN_TRANSFER, str(exc)) from None
                if ring.stopped:
                    raise ChunkError(ChunkErrorReason.INCOMPLETE,
                                     "the sender stopped before its last chunk") from None
                raise ChunkError(ChunkErrorReason.BAD_SHAPE, str(exc)) from None
            if (chunk.transfer_id, chunk.attempt) != (transfer_id, announced.attempt):
                raise ChunkError(ChunkErrorReason.BAD_RANGE,
                                 f"ring {ring.name} was announced for transfer {transfer_id!r} "
                                 f"attempt {announced.attempt}, its chunk {seq} names "
                                 f"{chunk.transfer_id!r} attempt {chunk.attempt}")
            yield chunk, payload

    def _lookup(self, transfer_id: str) -> Transfer:
        with self._lock:
            transfer = self._transfers.get(transfer_id)
        if transfer is None:
            raise ChunkError(ChunkErrorReason.UNKNOWN_TRANSFER,
                             f"transfer {transfer_id!r} is not expected here (expired or aborted)")
        return transfer

    def _accept(
        self, transfer: Transfer, chunk: kvtransfer_pb2.KVChunk, payload: memoryview | None
    ) -> int:
        """Validate chunk (its payload in the message, or `payload` from a ring) and write it;
        returns the KV bytes it carried."""
        if chunk.attempt < transfer.attempt:
            raise ChunkError(ChunkErrorReason.STALE_ATTEMPT,
                             f"attempt {chunk.attempt} is older than attempt {transfer.attempt}")
        if chunk.attempt > transfer.attempt:
            # a retry starts over: positions already written are simply overwritten
            transfer.reset(chunk.attempt, self.geometry.num_layers)
        if chunk.last and not chunk.payload and chunk.layer_start == chunk.layer_end:
            return 0  # nothing to send: the first token only
        k, v = decode_chunk(chunk, self.geometry, transfer.token_start, transfer.token_end, payload)
        for layer in range(chunk.layer_start, chunk.layer_end):
            if transfer.next_token[layer] != chunk.token_start:
                raise ChunkError(
                    ChunkErrorReason.BAD_RANGE,
                    f"layer {layer}: expected tokens from {transfer.next_token[layer]}, "
                    f"got [{chunk.token_start}, {chunk.token_end})",
                )
        try:
            self._write(transfer.request_id, chunk.layer_start, chunk.layer_end,
                        chunk.token_start, chunk.token_end, k, v)
        except ValueError as exc:  # the engine refused it (e.g. the request was aborted)
            raise ChunkError(ChunkErrorReason.BAD_RANGE, str(exc)) from exc
        for layer in range(chunk.layer_start, chunk.layer_end):
            transfer.next_token[layer] = chunk.token_end
        num_bytes = chunk_num_bytes(chunk) if payload is None else len(payload)
        self._on_bytes(num_bytes)
        return num_bytes

    def _complete(self, transfer: Transfer, first_token_id: int) -> None:
        if not transfer.complete:
            raise ChunkError(ChunkErrorReason.INCOMPLETE,
                             "last chunk arrived before all KV was received")
        if self.vocab_size is not None and not 0 <= first_token_id < self.vocab_size:
            raise ChunkError(ChunkErrorReason.BAD_RANGE,
                             f"first_token_id {first_token_id} is outside [0, {self.vocab_size})")
        with self._lock:
            if self._transfers.pop(transfer.transfer_id, None) is None:
                # the lease ran out (or the request was aborted) while the last chunk was written
                raise ChunkError(ChunkErrorReason.UNKNOWN_TRANSFER,
                                 f"transfer {transfer.transfer_id!r} ended before its last chunk")
        self._on_seconds(time.monotonic() - transfer.expected_at)
        self._on_complete(transfer.request_id, first_token_id)

    def _fail(self, transfer: Transfer, err: ChunkError) -> bool:
        """Fail transfer unless it has already left the table; True if this call failed it."""
        with self._lock:
            if self._transfers.pop(transfer.transfer_id, None) is None:
                return False  # already completed, cancelled or failed
        log.warning("request_id=%s: KV transfer %s failed: %s",
                    transfer.request_id, transfer.transfer_id, err)
        self._on_failure(err.reason)
        self._on_failed(transfer.request_id, err)
        return True

    def _reap(self) -> None:
        while not self._stop.wait(0.2):
            self._rings.drop_removed()  # their senders removed them: free their memory here
            now = time.monotonic()
            with self._lock:
                expired = [t for t in self._transfers.values() if t.deadline <= now]
            for t in expired:
                self._fail(t, ChunkError(
                    ChunkErrorReason.EXPIRED,
                    f"the KV did not arrive within the {self.lease_s:g} s lease"))
