"""Same-host KV transfer: a ring of slots in shared memory between a prefill and a decode worker.

Over gRPC a Python process moves about 1 GB/s however large its messages; on one host a ring in
/dev/shm moves KV at memory speed. The sender (prefill worker) owns its rings and reuses them, one
push per ring at a time, a few rings at most (RingPool). A push through a ring sends one message on
the Push stream, naming the transfer, the attempt and the ring; every chunk then passes through a
slot: its KVChunk header (payload left empty) and its payload side by side. The receiver (decode
worker) maps the ring by name (RingMaps) and validates each chunk as one that came over gRPC
(header, lengths, CRC-32C of the slot's payload), and that it belongs to the announced transfer,
before it writes a byte of it.

Layout: a HEADER_BYTES header of u64 words (magic, num_slots, slot_bytes, written, released, failed,
stopped), then num_slots slots of META_BYTES + slot_bytes each. A slot starts with two u64 (header
length, payload length) and the serialized KVChunk; its payload starts META_BYTES in.

Protocol, for chunk number seq of a push: the sender waits until released > seq - num_slots, fills
slot seq % num_slots, then sets written = seq + 1; the receiver waits until written > seq, reads the
slot, writes the KV into its pool, then sets released = seq + 1. A receiver that fails the transfer
sets failed, and the sender stops; a sender that ends before its last chunk sets stopped, and the
receiver fails the transfer (as when a stream ends early). Each counter is one aligned 8-byte store
made after the data it publishes; x86-64 keeps stores, and loads, in program order, so rings are
used only there (supported()); elsewhere transfers stay on gRPC.

Ring files are named baton-kv-<pid>-<random> and mapped by both sides. The owner holds a shared
flock on its file while it lives; sweep_stale() removes the files no process holds (a sender killed
with SIGKILL leaves its rings behind). Receivers drop the mappings of files that are gone. A mapping
is never unmapped explicitly: it goes with the last reference to its Ring, so a thread still
waiting on a ring that was removed meanwhile reads and writes valid (if orphaned) memory.
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import logging
import mmap
import os
import platform
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from google.protobuf.message import DecodeError

from baton.v1 import kvtransfer_pb2
from kvtransfer.codec import checksum

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
HEADER_BYTES = 4096
META_BYTES = 4096  # per slot: two lengths and the chunk's serialized header
SLOT_ALIGN = 4096  # slot sizes are rounded up to it: every payload starts page-aligned
# 4 slots of 4 MiB: ~20% faster on loopback than 8 of 1 MiB (fewer chunks to hand over)
DEFAULT_SLOT_BYTES = 4 << 20
DEFAULT_NUM_SLOTS = 4
DEFAULT_MAX_RINGS = 8  # per sender: pushes beyond it go in the stream
MAX_RING_BYTES = 1 << 30
MAGIC = int.from_bytes(b"BATONKV1", "little")
_MAGIC, _NUM_SLOTS, _SLOT_BYTES, _WRITTEN, _RELEASED, _FAILED, _STOPPED = range(7)
_NUM_WORDS = 7
_NAME = re.compile(r"baton-kv-\d+-[0-9a-f]{16}")
_LENGTHS = struct.Struct("<QQ")  # a slot's header length and payload length
_MAX_POLL_S = 0.002
MIN_STALE_AGE_S = 10.0  # sweep_stale() leaves younger files: their owner may not hold them yet


class RingError(RuntimeError):
    """A ring that cannot be used: missing, malformed, or stopped by the other side."""


def supported() -> bool:
    """Whether this host can pass KV through rings (x86-64, with /dev/shm)."""
    return platform.machine() in ("x86_64", "AMD64") and SHM_DIR.is_dir()


def _wait(ready: Callable[[], bool], alive: Callable[[], bool], what: str, deadline: float) -> None:
    """Poll until ready(); back off from 10 us to 2 ms. RingError once alive() is False;
    TimeoutError at deadline (time.monotonic())."""
    pause = 1e-5
    while not ready():
        if not alive():
            raise RingError(f"stopped while waiting for {what}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(pause)
        pause = min(2 * pause, _MAX_POLL_S)


def _ring_bytes(num_slots: int, slot_bytes: int) -> int:
    return HEADER_BYTES + num_slots * (META_BYTES + slot_bytes)


class Ring:
    """One mapping of a ring, on either side. Create with RingPool (sender) or RingMaps (receiver);
    num_slots and slot_bytes are the validated layout, never read back from shared memory."""

    def __init__(
        self, name: str, mm: mmap.mmap, num_slots: int, slot_bytes: int, fd: int | None = None
    ) -> None:
        self.name = name
        self.num_slots, self.slot_bytes = num_slots, slot_bytes
        self._mm = mm
        self._fd = fd  # the owner's descriptor, holding the shared flock; None on the receiver
        self._words = (ctypes.c_uint64 * _NUM_WORDS).from_buffer(mm)
        self._bytes = torch.frombuffer(mm, dtype=torch.uint8)  # the whole ring, for payload copies
        self._base = self._bytes.data_ptr()

    def _slot(self, seq: int) -> int:
        return HEADER_BYTES + (seq % self.num_slots) * (META_BYTES + self.slot_bytes)

    # -- sender --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Before a push: no chunk written or released, neither side failed or stopped."""
        for word in (_WRITTEN, _RELEASED, _FAILED, _STOPPED):
            self._words[word] = 0

    def stop(self) -> None:
        """Tell the receiver no more chunks will come (the push ended before its last one)."""
        self._words[_STOPPED] = 1

    @property
    def stopped(self) -> bool:
        return bool(self._words[_STOPPED])

    def write(
        self,
        seq: int,
        header: kvtransfer_pb2.KVChunk,
        tensors: tuple[torch.Tensor, ...],
        deadline: float,
        stop: threading.Event,
    ) -> int:
        """Chunk seq: header (payload empty) with the tensors' bytes back to back as its payload;
        sets header.crc32c. Waits for the slot until deadline; RingError if the receiver failed the
        transfer or stop is set (the push's call ended). Returns the payload's bytes."""
        _wait(lambda: seq - self._words[_RELEASED] < self.num_slots,
              lambda: not (self._words[_FAILED] or stop.is_set()),
              f"slot {seq % self.num_slots} of ring {self.name}", deadline)
        base = self._slot(seq)
        offset = payload = base + META_BYTES
        for t in tensors:
            n = t.numel() * t.element_size()
            if offset + n > payload + self.slot_bytes:
                raise ValueError(f"chunk payload exceeds the ring's {self.slot_bytes}-byte slots")
            if t.device.type == "cpu" and t.is_contiguous():
                ctypes.memmove(self._base + offset, t.data_ptr(), n)  # one thread, no GIL
            else:
                self._bytes[offset:offset + n].view(t.dtype).view(t.shape).copy_(t)
            offset += n
        num_bytes = offset - payload
        header.crc32c = checksum(memoryview(self._mm)[payload:offset])
        meta = header.SerializeToString()
        if len(meta) > META_BYTES - _LENGTHS.size:
            raise ValueError(f"chunk header of {len(meta)} bytes does not fit a ring slot")
        _LENGTHS.pack_into(self._mm, base, len(meta), num_bytes)
        self._mm[base + _LENGTHS.size:base + _LENGTHS.size + len(meta)] = meta
        self._words[_WRITTEN] = seq + 1  # publishes the slot
        return num_bytes

    # -- receiver ------------------------------------------------------------------------------

    def read(
        self, seq: int, alive: Callable[[], bool], deadline: float
    ) -> tuple[kvtransfer_pb2.KVChunk, memoryview]:
        """Chunk seq once written: a copy of its header and a view of its payload, valid until
        release(seq). Raises RingError for a malformed slot, or when alive() turns False or the
        sender stops while waiting."""
        _wait(lambda: self._words[_WRITTEN] > seq, lambda: alive() and not self.stopped,
              f"chunk {seq} in ring {self.name}", deadline)
        base = self._slot(seq)
        meta_len, num_bytes = _LENGTHS.unpack_from(self._mm, base)
        if meta_len > META_BYTES - _LENGTHS.size or num_bytes > self.slot_bytes:
            raise RingError(f"ring {self.name}: slot lengths {meta_len}, {num_bytes} out of bounds")
        start = base + _LENGTHS.size
        try:
            header = kvtransfer_pb2.KVChunk.FromString(self._mm[start:start + meta_len])
        except DecodeError as exc:
            raise RingError(f"ring {self.name}: slot {seq % self.num_slots}: {exc}") from None
        payload = base + META_BYTES
        return header, memoryview(self._mm)[payload:payload + num_bytes]

    def release(self, seq: int) -> None:
        self._words[_RELEASED] = seq + 1

    def fail(self) -> None:
        """Tell the sender to stop: the transfer failed here."""
        self._words[_FAILED] = 1

    def remove(self) -> None:
        """The owner's: delete the file and drop the flock (the mapping stays while referenced)."""
        try:
            os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RingPool:
    """The sender's rings, at most max_rings: acquire() one per push (a new one when none is free;
    None when max_rings are in use), give it back with release(); close() removes them all."""

    def __init__(self, slot_bytes: int = DEFAULT_SLOT_BYTES, num_slots: int = DEFAULT_NUM_SLOTS,
                 max_rings: int = DEFAULT_MAX_RINGS) -> None:
        slot_bytes = -(-slot_bytes // SLOT_ALIGN) * SLOT_ALIGN
        if num_slots < 1 or slot_bytes < 1 or max_rings < 1 or (
                _ring_bytes(num_slots, slot_bytes) > MAX_RING_BYTES):
            raise ValueError(f"rings of {num_slots} slots of {slot_bytes} bytes, {max_rings} at "
                             f"most: need one slot and one ring at least, {MAX_RING_BYTES} bytes "
                             "a ring at most")
        self.slot_bytes, self.num_slots, self.max_rings = slot_bytes, num_slots, max_rings
        self._free: list[Ring] = []
        self._all: dict[str, Ring] = {}
        self._closed = False
        self._lock = threading.Lock()

    def acquire(self) -> Ring | None:
        """A free ring, or a new one; None when max_rings are in use or the pool is closed.
        OSError when /dev/shm has no room for a new one."""
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._closed or len(self._all) >= self.max_rings:
                return None
            name = f"baton-kv-{os.getpid()}-{secrets.token_hex(8)}"
            self._all[name] = None  # counted while it is made
        try:
            ring = self._create(name)
        except BaseException:
            with self._lock:
                self._all.pop(name, None)
            raise
        with self._lock:
            if not self._closed:
                self._all[name] = ring
                return ring
        ring.remove()
        return None

    def release(self, ring: Ring, reusable: bool) -> None:
        """reusable: the push ended with the receiver done with every slot (it acknowledged);
        otherwise the ring is removed, since a late reader may still hold a view of it."""
        with self._lock:
            if self._all.get(ring.name) is not ring:
                return  # removed by close() already
            if reusable and not self._closed:
                self._free.append(ring)
                return
            del self._all[ring.name]
        ring.remove()

    def close(self) -> None:
        with self._lock:
            rings = [ring for ring in self._all.values() if ring is not None]
            self._all, self._free, self._closed = {}, [], True
        for ring in rings:
            ring.remove()

    def _create(self, name: str) -> Ring:
        size = _ring_bytes(self.num_slots, self.slot_bytes)
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            # every page now: a full /dev/shm (64 MB in a default container) fails here, with
            # ENOSPC, instead of killing the process with SIGBUS at the first write
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(SHM_DIR / name)
            raise
        struct.pack_into("<QQQ", mm, 0, MAGIC, self.num_slots, self.slot_bytes)
        return Ring(name, mm, self.num_slots, self.slot_bytes, fd)


class RingMaps:
    """The receiver's mappings of senders' rings, by name; at most max_rings, least recently used
    dropped first. forget() drops one; drop_removed() those whose file is gone (their sender
    removed them), so their memory is freed."""

    def __init__(self, max_rings: int = 64) -> None:
        self.max_rings = max_rings
        self._rings: collections.OrderedDict[str, Ring] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> Ring:
        """The ring `name`, mapped on first use. RingError when it is not a valid ring here."""
        with self._lock:
            ring = self._rings.get(name)
            if ring is not None:
                self._rings.move_to_end(name)
                return ring
        ring = _open(name)
        with self._lock:
            self._rings[name] = ring
            while len(self._rings) > self.max_rings:
                self._rings.popitem(last=False)
        return ring

    def forget(self, name: str) -> None:
        with self._lock:
            self._rings.pop(name, None)

    def drop_removed(self) -> None:
        with self._lock:
            names = list(self._rings)
        for name in names:
            if not (SHM_DIR / name).exists():
                self.forget(name)

    def close(self) -> None:
        with self._lock:
            self._rings.clear()


def _open(name: str) -> Ring:
    if not _NAME.fullmatch(name):
        raise RingError(f"{name!r} is not a ring name")
    try:
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise RingError(f"cannot open ring {name}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES:
            raise RingError(f"ring {name} is {size} bytes, smaller than its header")
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    magic, num_slots, slot_bytes = struct.unpack_from("<QQQ", mm, 0)
    if magic != MAGIC or not (num_slots >= 1 and slot_bytes >= 1) or (
            size != _ring_bytes(num_slots, slot_bytes)):
        raise RingError(f"ring {name} is malformed (magic, size or slot counts)")
    return Ring(name, mm, num_slots, slot_bytes)


def sweep_stale() -> int:
    """Remove ring files no live process holds (their owners were killed); returns how many."""
    removed = 0
    for path in SHM_DIR.glob("baton-kv-*"):
        if not _NAME.fullmatch(path.name):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            # held shared by a live owner; a file seconds old may not be locked yet
            if time.time() - os.fstat(fd).st_ctime < MIN_STALE_AGE_S:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        finally:
            os.close(fd)
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d KV rings left by stopped processes", removed)
    return removed
