"""Shared-memory rings (kvtransfer/shm.py): a push through a ring into a real KVReceiver, wrap-around
with slots smaller than the transfer, a corrupted chunk, a sender that goes away, the ring check,
and the lifecycle of ring files (reuse, removal, stale files, names and layouts refused)."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import grpc
import pytest
import torch

from baton.v1 import kvtransfer_pb2
from kvtransfer import shm
from kvtransfer.codec import ChunkErrorReason, KVGeometry, chunk_header
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import iter_ring_push

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not shm.supported(), reason="rings need x86-64 and /dev/shm"),
]

# a token of a layer is 8 KiB: slots of 3 tokens keep their 4 KiB alignment
GEOM = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=512, dtype=torch.float32)
NUM_TOKENS = 10


class Context:
    """The receiver's side of a Push call: active until ended."""

    def __init__(self) -> None:
        self.active = True
        self.code = None

    def is_active(self) -> bool:
        return self.active

    def abort(self, code, details):
        self.code, self.details = code, details
        raise grpc.RpcError(details)


class Decode:
    """A KVReceiver writing into tensors, with what its callbacks saw."""

    def __init__(self, lease_s: float = 30.0) -> None:
        shape = (GEOM.num_layers, NUM_TOKENS, GEOM.num_kv_heads, GEOM.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.completed: list[tuple[str, int]] = []
        self.failures: list[ChunkErrorReason] = []
        self.num_bytes: list[int] = []
        self.rx = KVReceiver(GEOM, write=self._write,
                             on_complete=lambda rid, tok: self.completed.append((rid, tok)),
                             on_failed=lambda rid, err: None, on_failure=self.failures.append,
                             on_bytes=self.num_bytes.append, lease_s=lease_s)

    def _write(self, rid, l0, l1, t0, t1, k, v):
        self.k[l0:l1, t0:t1] = k
        self.v[l0:l1, t0:t1] = v


@pytest.fixture
def pool():
    pool = shm.RingPool(slot_bytes=3 * GEOM.bytes_per_token_layer, num_slots=2)
    yield pool
    pool.close()


@pytest.fixture
def decode():
    decode = Decode()
    yield decode
    decode.rx.close()


def source_kv():
    g = torch.Generator().manual_seed(0)
    shape = (GEOM.num_layers, NUM_TOKENS, GEOM.num_kv_heads, GEOM.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def push(decode: Decode, ring: shm.Ring, k, v, token_start: int = 0, context=None):
    """Drive a push through ring: the receiver in a thread, the sender here. Returns (the
    receiver's reply or exception, the sender's exception or None)."""
    chunks = iter_ring_push(
        ring, transfer_id="t1", attempt=0, geometry=GEOM, token_start=token_start,
        token_end=NUM_TOKENS, read_kv=lambda l0, l1, t0, t1: (k[l0:l1, t0:t1], v[l0:l1, t0:t1]),
        first_token_id=7, timeout_s=10.0, call_done=threading.Event())
    announce = next(chunks)
    assert announce.ring == ring.name and not announce.payload
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(reply=_push_result(decode, announce, context)))
    thread.start()
    sender_error = None
    try:
        for _ in chunks:
            pass
    except (shm.RingError, TimeoutError) as exc:
        sender_error = exc
    thread.join(10)
    assert not thread.is_alive()
    return result["reply"], sender_error


def test_push_through_a_ring_wraps_around_and_arrives_intact(pool, decode):
    k, v = source_kv()
    ring = pool.acquire()
    decode.rx.expect("t1", "req", 2, NUM_TOKENS)
    reply, sender_error = push(decode, ring, k, v, token_start=2)
    assert sender_error is None
    assert reply.num_bytes == (NUM_TOKENS - 2) * GEOM.bytes_per_token
    assert decode.completed == [("req", 7)]
    assert torch.equal(decode.k[:, 2:], k[:, 2:]) and torch.equal(decode.v[:, 2:], v[:, 2:])
    assert torch.count_nonzero(decode.k[:, :2]) == 0  # cached positions are not sent
    # 3 layers x 8 tokens in 3-token slots: 9 chunks and the last through 2 slots
    assert len(decode.num_bytes) == 9 and sum(decode.num_bytes) == reply.num_bytes
    pool.release(ring, reusable=True)
    assert pool.acquire() is ring  # reused for the next push


def test_a_corrupted_chunk_fails_the_transfer_and_stops_the_sender(pool, decode, monkeypatch):
    k, v = source_kv()
    ring = pool.acquire()
    decode.rx.expect("t1", "req", 0, NUM_TOKENS)
    real = shm.checksum
    calls = []

    def corrupting(*parts):
        calls.append(1)
        return real(*parts) ^ (1 if len(calls) == 2 else 0)  # the second chunk's payload

    monkeypatch.setattr(shm, "checksum", corrupting)
    reply, sender_error = push(decode, ring, k, v)
    assert isinstance(reply, grpc.RpcError) and "checksum" in str(reply)
    assert decode.failures == [ChunkErrorReason.CHECKSUM] and decode.completed == []
    assert isinstance(sender_error, shm.RingError)  # told to stop, not left waiting for a slot
    assert torch.count_nonzero(decode.k[1:]) == 0  # nothing written past the first chunk's layer
    assert ring.name not in decode.rx._rings._rings  # its memory goes with the sender's file


def test_a_ring_chunk_of_another_transfer_fails_the_announced_one(pool, decode):
    k, v = source_kv()
    ring = pool.acquire()
    decode.rx.expect("t1", "req1", 0, NUM_TOKENS)
    decode.rx.expect("t2", "req2", 0, NUM_TOKENS)
    ring.reset()
    piece = (k[0:1, 0:3], v[0:1, 0:3])
    ring.write(0, chunk_header("t2", 0, 0, 0, piece[0]), piece, time.monotonic() + 5,
               threading.Event())
    context = Context()
    with pytest.raises(grpc.RpcError, match="announced for transfer 't1'"):
        decode.rx.Push(iter([kvtransfer_pb2.KVChunk(transfer_id="t1", ring=ring.name)]), context)
    assert decode.failures == [ChunkErrorReason.BAD_RANGE]
    assert torch.count_nonzero(decode.k) == 0  # nothing written, for either transfer
    assert decode.rx.cancel_request("req2")  # t2 is still expected, untouched


def test_a_pool_hands_out_at_most_max_rings_of_whole_pages():
    pool = shm.RingPool(slot_bytes=100, num_slots=2, max_rings=2)
    try:
        assert pool.slot_bytes == shm.SLOT_ALIGN
        first, second = pool.acquire(), pool.acquire()
        assert first is not None and second is not None
        assert pool.acquire() is None  # the third push goes in the stream
        pool.release(first, reusable=True)
        assert pool.acquire() is first
    finally:
        pool.close()
    assert pool.acquire() is None
    assert not (shm.SHM_DIR / first.name).exists() and not (shm.SHM_DIR / second.name).exists()


def test_a_sender_that_stops_early_fails_the_transfer_at_once(pool, decode):
    k, v = source_kv()
    ring = pool.acquire()
    decode.rx.expect("t1", "req", 0, NUM_TOKENS)

    def read_kv(l0, l1, t0, t1):
        if l0 == 1:  # the request was preempted or aborted while layer 1 was being sent
            raise RuntimeError("the request's KV is gone")
        return k[l0:l1, t0:t1], v[l0:l1, t0:t1]

    chunks = iter_ring_push(ring, transfer_id="t1", attempt=0, geometry=GEOM, token_start=0,
                            token_end=NUM_TOKENS, read_kv=read_kv, first_token_id=7,
                            timeout_s=10.0, call_done=threading.Event())
    announce = next(chunks)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(reply=_push_result(decode, announce)))
    thread.start()
    with pytest.raises(RuntimeError, match="KV is gone"):
        for _ in chunks:
            pass
    thread.join(5)
    assert not thread.is_alive(), "the receiver waited on a sender that had stopped"
    assert isinstance(result["reply"], grpc.RpcError) and "last chunk" in str(result["reply"])
    assert decode.failures == [ChunkErrorReason.INCOMPLETE]


def _push_result(decode: Decode, announce, context=None):
    """The receiver's reply to a push announcing a ring, or its error."""
    try:
        return decode.rx.Push(iter([announce]), context or Context())
    except grpc.RpcError as exc:
        return exc


def test_a_sender_gone_mid_push_ends_the_stream_without_failing_the_transfer(pool, decode):
    ring = pool.acquire()
    decode.rx.expect("t1", "req", 0, NUM_TOKENS)
    announce = kvtransfer_pb2.KVChunk(transfer_id="t1", attempt=0, ring=ring.name)
    context = Context()
    threading.Timer(0.2, lambda: setattr(context, "active", False)).start()
    reply = decode.rx.Push(iter([announce]), context)  # waits, then sees the call end
    assert reply.num_bytes == 0
    assert decode.failures == []  # the lease, or a retry, settles the transfer
    assert decode.rx.cancel_request("req")


def test_a_sender_waiting_for_a_slot_stops_when_its_call_ends(pool):
    ring = pool.acquire()  # 2 slots, and no receiver to release them
    k, v = source_kv()
    call_done = threading.Event()
    chunks = iter_ring_push(
        ring, transfer_id="t1", attempt=0, geometry=GEOM, token_start=0, token_end=NUM_TOKENS,
        read_kv=lambda l0, l1, t0, t1: (k[l0:l1, t0:t1], v[l0:l1, t0:t1]), first_token_id=7,
        timeout_s=30.0, call_done=call_done)
    next(chunks)
    threading.Timer(0.2, call_done.set).start()
    start = time.monotonic()
    with pytest.raises(shm.RingError, match="stopped while waiting for slot 0"):
        next(chunks)  # fills slots 0 and 1, then waits for slot 0 again
    assert time.monotonic() - start < 5


def test_ring_check_answers_only_for_a_ring_it_can_open(pool, decode):
    ring = pool.acquire()
    assert decode.rx.CheckRing(kvtransfer_pb2.RingCheck(ring=ring.name), None).ok
    missing = decode.rx.CheckRing(kvtransfer_pb2.RingCheck(ring="baton-kv-1-0000000000000000"),
                                  None)
    assert not missing.ok and "cannot open" in missing.detail


@pytest.mark.parametrize("name", ["../../etc/passwd", "baton-kv-1-zz", "other", ""])
def test_names_that_are_not_ring_names_are_refused(name):
    with pytest.raises(shm.RingError, match="not a ring name"):
        shm.RingMaps().get(name)


def test_a_file_that_is_not_a_ring_is_refused():
    path = shm.SHM_DIR / "baton-kv-1-00000000deadbeef"
    path.write_bytes(b"\0" * (2 * shm.HEADER_BYTES))
    try:
        with pytest.raises(shm.RingError, match="malformed"):
            shm.RingMaps().get(path.name)
    finally:
        path.unlink()


def test_rings_are_removed_when_not_reusable_and_on_close(pool):
    first, second = pool.acquire(), pool.acquire()
    assert first.name != second.name
    pool.release(first, reusable=False)  # a push that failed: a late reader may hold a view
    assert not (shm.SHM_DIR / first.name).exists()
    assert (shm.SHM_DIR / second.name).exists()
    pool.close()
    assert not (shm.SHM_DIR / second.name).exists()


def test_sweep_removes_only_rings_no_live_owner_holds(pool, monkeypatch):
    monkeypatch.setattr(shm, "MIN_STALE_AGE_S", 0.0)
    live = pool.acquire()
    stale = shm.SHM_DIR / "baton-kv-999999-00000000cafef00d"
    stale.write_bytes(b"\0" * shm.HEADER_BYTES)  # as a killed owner leaves it: no flock held
    try:
        assert shm.sweep_stale() >= 1
        assert not stale.exists()
        assert (shm.SHM_DIR / live.name).exists()
    finally:
        stale.unlink(missing_ok=True)


def test_the_owner_holds_its_ring_file_locked(pool):
    ring = pool.acquire()
    fd = os.open(shm.SHM_DIR / ring.name, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
