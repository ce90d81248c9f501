"""KV chunk codec and receiver: validation before any write, leases, retries."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from baton.v1 import kvtransfer_pb2
from kvtransfer.codec import ChunkError, ChunkErrorReason, KVGeometry, decode_chunk, encode_chunk
from kvtransfer.receiver import FAILURE_REASONS, REFUSAL_REASONS, KVReceiver
from kvtransfer.sender import iter_chunks

pytestmark = pytest.mark.unit

GEOM = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32)


def kv(num_layers: int, num_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_layers, num_tokens, GEOM.num_kv_heads, GEOM.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_roundtrip_is_exact():
    k, v = kv(2, 5)
    chunk = encode_chunk("t", 0, 1, 3, k, v)
    k2, v2 = decode_chunk(chunk, GEOM, 0, 10)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    assert len(chunk.payload) == 2 * 2 * 5 * 2 * 4 * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_roundtrip_half_precision(dtype):
    geom = KVGeometry(3, 2, 4, dtype)
    k, v = (t.to(dtype) for t in kv(1, 3))
    k2, v2 = decode_chunk(encode_chunk("t", 0, 0, 0, k, v), geom, 0, 3)
    assert torch.equal(k, k2) and torch.equal(v, v2)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda c: setattr(c, "layer_end", 4), ChunkErrorReason.BAD_RANGE),
        (lambda c: setattr(c, "token_end", 11), ChunkErrorReason.BAD_RANGE),
        (lambda c: setattr(c, "token_start", -1), ChunkErrorReason.BAD_RANGE),
        (lambda c: setattr(c, "num_kv_heads", 3), ChunkErrorReason.BAD_SHAPE),
        (lambda c: setattr(c, "dtype", "int8"), ChunkErrorReason.BAD_SHAPE),
        (lambda c: setattr(c, "payload", c.payload[:-4]), ChunkErrorReason.BAD_SHAPE),
        (lambda c: setattr(c, "payload", bytes([c.payload[0] ^ 1]) + c.payload[1:]),
         ChunkErrorReason.CHECKSUM),
    ],
)
def test_bad_chunks_are_refused(mutate, reason):
    k, v = kv(1, 2)
    chunk = encode_chunk("t", 0, 2, 8, k, v)
    mutate(chunk)
    with pytest.raises(ChunkError) as info:
        decode_chunk(chunk, GEOM, 0, 10)
    assert info.value.reason is reason


class FakeContext:
    def __init__(self):
        self.code = None

    def abort(self, code, details):
        self.code, self.details = code, details
        raise grpc.RpcError(details)


class Sink:
    """Records what the receiver does through its callbacks."""

    def __init__(self, num_tokens: int):
        self.k = torch.zeros(GEOM.num_layers, num_tokens, GEOM.num_kv_heads, GEOM.head_dim)
        self.v = torch.zeros_like(self.k)
        self.completed: list[tuple[str, int]] = []
        self.failed: list[tuple[str, ChunkErrorReason]] = []
        self.done = threading.Event()
        # what the metric hooks saw
        self.num_bytes: list[int] = []
        self.seconds: list[float] = []
        self.failures: list[ChunkErrorReason] = []
        self.refusals: list[ChunkErrorReason] = []

    def write(self, rid, l0, l1, t0, t1, k, v):
        self.k[l0:l1, t0:t1] = k
        self.v[l0:l1, t0:t1] = v

    def receiver(self, lease_s: float = 30.0, vocab_size: int | None = None) -> KVReceiver:
        return KVReceiver(
            GEOM, write=self.write,
            on_complete=lambda rid, tok: (self.completed.append((rid, tok)), self.done.set()),
            on_failed=lambda rid, err: (self.failed.append((rid, err.reason)), self.done.set()),
            on_bytes=self.num_bytes.append, on_seconds=self.seconds.append,
            on_failure=self.failures.append, on_refusal=self.refusals.append,
            lease_s=lease_s, vocab_size=vocab_size,
        )


def chunks_for(k, v, token_start, token_end, attempt=0, first_token=7, chunk_bytes=64):
    return list(iter_chunks(
        transfer_id="t1", attempt=attempt, geometry=GEOM, token_start=token_start,
        token_end=token_end,
        read_kv=lambda l0, l1, t0, t1: (k[l0:l1, t0:t1], v[l0:l1, t0:t1]),
        first_token_id=first_token, chunk_bytes=chunk_bytes,
    ))


def test_receiver_assembles_a_transfer_and_skips_cached_tokens():
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    rx = sink.receiver()
    rx.expect("t1", "req", 4, 10)
    chunks = chunks_for(k, v, 4, 10)
    assert len(chunks) > GEOM.num_layers  # several chunks per layer at 64 bytes
    ack = rx.Push(iter(chunks), FakeContext())
    assert ack.num_bytes == 6 * GEOM.bytes_per_token
    assert sink.completed == [("req", 7)]
    assert torch.equal(sink.k[:, 4:], k[:, 4:]) and torch.equal(sink.v[:, 4:], v[:, 4:])
    assert torch.count_nonzero(sink.k[:, :4]) == 0  # cached positions were not sent
    rx.close()


def test_receiver_nothing_to_send_still_delivers_first_token():
    sink = Sink(8)
    rx = sink.receiver()
    rx.expect("t1", "req", 8, 8)
    chunks = chunks_for(*kv(GEOM.num_layers, 8), 8, 8)
    assert len(chunks) == 1 and chunks[0].last
    rx.Push(iter(chunks), FakeContext())
    assert sink.completed == [("req", 7)]
    rx.close()


def test_receiver_refuses_corrupt_chunk_and_fails_only_that_transfer():
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    rx = sink.receiver()
    rx.expect("t1", "req", 0, 10)
    chunks = chunks_for(k, v, 0, 10)
    bad = chunks[2]
    bad.payload = bytes(len(bad.payload))
    ctx = FakeContext()
    with pytest.raises(grpc.RpcError):
        rx.Push(iter(chunks), ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.failed == [("req", ChunkErrorReason.CHECKSUM)]
    assert sink.completed == []
    # the failed transfer is gone: a late chunk is refused as unknown
    ctx = FakeContext()
    with pytest.raises(grpc.RpcError):
        rx.Push(iter(chunks[:1]), ctx)
    assert ctx.code == grpc.StatusCode.NOT_FOUND
    rx.close()


def test_receiver_fails_a_first_token_outside_the_vocabulary_before_committing():
    k, v = kv(GEOM.num_layers, 4)
    sink = Sink(4)
    rx = sink.receiver(vocab_size=100)
    rx.expect("t1", "req", 0, 4)
    ctx = FakeContext()
    with pytest.raises(grpc.RpcError):
        rx.Push(iter(chunks_for(k, v, 0, 4, first_token=100)), ctx)
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "first_token_id 100" in ctx.details
    assert sink.failed == [("req", ChunkErrorReason.BAD_RANGE)] and sink.completed == []
    rx.expect("t1", "req2", 0, 4)  # the failed transfer is gone; the id is free again
    rx.Push(iter(chunks_for(k, v, 0, 4, first_token=99)), FakeContext())
    assert sink.completed == [("req2", 99)]
    rx.close()


def test_receiver_refuses_out_of_order_and_early_last():
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    rx = sink.receiver()
    rx.expect("t1", "req", 0, 10)
    chunks = chunks_for(k, v, 0, 10)
    with pytest.raises(grpc.RpcError):
        rx.Push(iter([chunks[1]]), FakeContext())  # skips the layer's first tokens
    assert sink.failed == [("req", ChunkErrorReason.BAD_RANGE)]

    sink2 = Sink(10)
    rx2 = sink2.receiver()
    rx2.expect("t1", "req", 0, 10)
    early_last = chunks[0]
    early_last.last = True
    with pytest.raises(grpc.RpcError):
        rx2.Push(iter([early_last]), FakeContext())
    assert sink2.failed == [("req", ChunkErrorReason.INCOMPLETE)]
    rx.close(), rx2.close()


def test_broken_stream_keeps_lease_and_retry_attempt_completes():
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    rx = sink.receiver()
    rx.expect("t1", "req", 0, 10)

    def broken(chunks):
        yield from chunks
        raise grpc.RpcError("sender died")

    first = chunks_for(k, v, 0, 10, attempt=0)
    with pytest.raises(grpc.RpcError):
        rx.Push(broken(first[:2]), FakeContext())
    assert sink.failed == [] and sink.completed == []  # the lease still holds the reservation
    k2, v2 = kv(GEOM.num_layers, 10, seed=1)
    retry = chunks_for(k2, v2, 0, 10, attempt=1)
    with pytest.raises(grpc.RpcError):
        rx.Push(broken(retry[:1]), FakeContext())
    ctx = FakeContext()
    with pytest.raises(grpc.RpcError):
        rx.Push(iter(first[2:3]), ctx)  # a late chunk of the dead first attempt
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION
    assert sink.failed == []  # refused that stream only; the retry goes on
    k3, v3 = kv(GEOM.num_layers, 10, seed=2)
    rx.Push(iter(chunks_for(k3, v3, 0, 10, attempt=2)), FakeContext())
    assert sink.completed == [("req", 7)]
    assert torch.equal(sink.k, k3) and torch.equal(sink.v, v3)
    rx.close()


def test_lease_expiry_fails_the_transfer():
    sink = Sink(4)
    rx = sink.receiver(lease_s=0.3)
    rx.expect("t1", "req", 0, 4)
    t0 = time.monotonic()
    assert sink.done.wait(5)
    assert time.monotonic() - t0 >= 0.3
    assert sink.failed == [("req", ChunkErrorReason.EXPIRED)]
    rx.close()


def test_cancel_request_forgets_transfer_without_callback():
    sink = Sink(4)
    rx = sink.receiver(lease_s=0.3)
    rx.expect("t1", "req", 0, 4)
    assert rx.cancel_request("req")
    time.sleep(0.6)
    assert sink.failed == [] and sink.completed == []
    rx.close()


# -- metric hooks -------------------------------------------------------------------------------


def refused(rx: KVReceiver, chunks) -> grpc.StatusCode:
    ctx = FakeContext()
    with pytest.raises(grpc.RpcError):
        rx.Push(iter(chunks), ctx)
    return ctx.code


def test_completed_transfer_observes_its_seconds_once():
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    rx = sink.receiver()
    t0 = time.monotonic()
    rx.expect("t1", "req", 2, 10)
    time.sleep(0.05)  # the clock runs from the reservation, not from the first chunk
    ack = rx.Push(iter(chunks_for(k, v, 2, 10)), FakeContext())
    elapsed = time.monotonic() - t0
    assert len(sink.seconds) == 1 and 0.05 <= sink.seconds[0] <= elapsed
    assert sum(sink.num_bytes) == ack.num_bytes == 8 * GEOM.bytes_per_token
    assert sink.failures == [] and sink.refusals == []
    rx.close()


def _corrupt(chunks, **fields):
    for name, value in fields.items():
        setattr(chunks[0], name, value)
    return chunks[:1]


# How to make a Push fail its transfer for each reason (the lease case has its own test).
FAILING_PUSHES = {
    ChunkErrorReason.BAD_RANGE: lambda chunks: chunks[1:2],  # skips the layer's first tokens
    ChunkErrorReason.BAD_SHAPE: lambda chunks: _corrupt(chunks, payload=chunks[0].payload[:-4]),
    ChunkErrorReason.BAD_COMPRESSION: lambda chunks: _corrupt(chunks, compression="zstd"),
    ChunkErrorReason.CHECKSUM: lambda chunks: _corrupt(chunks, crc32c=chunks[0].crc32c ^ 1),
    ChunkErrorReason.INCOMPLETE: lambda chunks: chunks[:-1],  # the stream ends early
}


@pytest.mark.parametrize("reason", [r for r in FAILURE_REASONS if r is not ChunkErrorReason.EXPIRED])
def test_each_failure_reason_counts_once(reason):
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    rx = sink.receiver()
    rx.expect("t1", "req", 0, 10)
    assert refused(rx, FAILING_PUSHES[reason](chunks_for(k, v, 0, 10))) == grpc.StatusCode.INVALID_ARGUMENT
    assert sink.failures == [reason] and sink.failed == [("req", reason)]
    # a retry of the failed transfer is refused on its own: no second failure
    assert refused(rx, chunks_for(k, v, 0, 10, attempt=1)) == grpc.StatusCode.NOT_FOUND
    assert sink.failures == [reason]
    assert sink.refusals == [ChunkErrorReason.UNKNOWN_TRANSFER]
    assert sink.seconds == [] and sink.completed == []
    rx.close()


def test_expired_lease_counts_one_failure():
    sink = Sink(4)
    rx = sink.receiver(lease_s=0.2)
    rx.expect("t1", "req", 0, 4)
    assert sink.done.wait(5)
    time.sleep(0.5)  # the reaper keeps running: it must not count the transfer again
    assert sink.failures == [ChunkErrorReason.EXPIRED]
    assert sink.refusals == [] and sink.seconds == []
    rx.close()


def test_stream_only_refusals_are_not_failures():
    assert set(REFUSAL_REASONS) == {ChunkErrorReason.UNKNOWN_TRANSFER,
                                    ChunkErrorReason.STALE_ATTEMPT,
                                    ChunkErrorReason.RING_UNAVAILABLE}
    assert not set(REFUSAL_REASONS) & set(FAILURE_REASONS)
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    rx = sink.receiver()
    assert refused(rx, chunks_for(k, v, 0, 10)) == grpc.StatusCode.NOT_FOUND  # never expected
    rx.expect("t1", "req", 0, 10)
    assert refused(rx, chunks_for(k, v, 0, 10, attempt=1)[:1] + chunks_for(k, v, 0, 10)[:1]) \
        == grpc.StatusCode.FAILED_PRECONDITION  # attempt 0 after attempt 1 began
    missing_ring = kvtransfer_pb2.KVChunk(transfer_id="t1", attempt=2,
                                          ring="baton-kv-1-0123456789abcdef")
    assert refused(rx, [missing_ring]) == grpc.StatusCode.FAILED_PRECONDITION
    assert sink.refusals == [ChunkErrorReason.UNKNOWN_TRANSFER, ChunkErrorReason.STALE_ATTEMPT,
                             ChunkErrorReason.RING_UNAVAILABLE]
    assert sink.failures == [] and sink.failed == []
    rx.Push(iter(chunks_for(k, v, 0, 10, attempt=2)), FakeContext())
    assert sink.completed == [("req", 7)] and len(sink.seconds) == 1
    assert sink.failures == []
    rx.close()


def test_transfer_cancelled_during_its_last_write_is_neither_completed_nor_failed():
    k, v = kv(GEOM.num_layers, 10)
    sink = Sink(10)
    chunks = chunks_for(k, v, 0, 10)

    def write(rid, l0, l1, t0, t1, k, v):
        if l1 == GEOM.num_layers and t1 == 10:  # the last chunk: the request is aborted meanwhile
            rx.cancel_request(rid)

    rx = KVReceiver(
        GEOM, write=write,
        on_complete=lambda rid, tok: sink.completed.append((rid, tok)),
        on_failed=lambda rid, err: sink.failed.append((rid, err.reason)),
        on_seconds=sink.seconds.append, on_failure=sink.failures.append,
        on_refusal=sink.refusals.append,
    )
    rx.expect("t1", "req", 0, 10)
    assert refused(rx, chunks) == grpc.StatusCode.NOT_FOUND
    assert sink.completed == [] and sink.failed == [] and sink.seconds == []
    assert sink.failures == [] and sink.refusals == [ChunkErrorReason.UNKNOWN_TRANSFER]
    rx.close()
