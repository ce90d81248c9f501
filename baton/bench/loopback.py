"""The KV transfer benchmark's wire part: KV pushed on loopback, whole and stage by stage.

LoopbackKV holds random K/V of up to max_tokens tokens of a geometry and two gRPC servers on
127.0.0.1: a real KVReceiver whose write callback copies each chunk into a preallocated tensor (the
decode worker's path without its engine), and a sink that only counts the bytes it is streamed.
push(n) sends the first n tokens' KV as the prefill worker does, layer by layer: in the gRPC stream
(iter_chunks, ~1 MiB chunks, push_kv), or through a shared-memory ring (iter_ring_push, 4 MiB
slots: what a prefill worker does for a decode worker on its host), and returns once the receiver
has written all of it and acknowledged.

Lifecycle: LoopbackKV(geometry, max_tokens) (servers start) -> push / push_to_sink / ... -> close()
(servers stop, the receiver's lease reaper ends). One push at a time.

measure_wire times, interleaved num_repeats times, best of all: the whole push, in the stream and
through a ring; an in-process copy of the same bytes (roofline.copy_bytes_per_s); and each stage of
the stream's push alone on the same chunks: encode
(iter_chunks: tensor to bytes, CRC-32C, protobuf message), gRPC (pre-encoded chunks streamed to the
sink: serialization, transport, parsing), decode (decode_chunk: header checks, CRC-32C, bytes to
tensor) and write (copy into the preallocated tensor).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc
import torch

from baton.bench import roofline
from baton.bench.kvtransfer_config import WIRE_GEOMETRY, KVTransferBenchConfig
from baton.bench.report import div, fmt
from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc
from baton.wire import GRPC_OPTIONS
from kvtransfer import shm
from kvtransfer.codec import ChunkError, KVGeometry, decode_chunk
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import iter_chunks, iter_ring_push, push_kv

logger = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 120.0
STAGES = ("encode", "grpc", "decode", "write")
_transfer_numbers = itertools.count()


class _Sink(kvtransfer_pb2_grpc.KVTransferServicer):
    """Reads a Push stream to its end and acknowledges its payload bytes; decodes nothing."""

    def Push(self, request_iterator: Iterator[kvtransfer_pb2.KVChunk], context):
        return kvtransfer_pb2.PushAck(num_bytes=sum(len(c.payload) for c in request_iterator))


def _serve(servicer: kvtransfer_pb2_grpc.KVTransferServicer) -> tuple[grpc.Server, grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise RuntimeError("could not bind a loopback port for the KV receiver")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)


class LoopbackKV:
    def __init__(self, geometry: KVGeometry, max_tokens: int, seed: int = 0) -> None:
        self.geometry = geometry
        shape = (geometry.num_layers, max_tokens, geometry.num_kv_heads, geometry.head_dim)
        generator = torch.Generator().manual_seed(seed)
        # k, v, dest_k, dest_v: [num_layers, max_tokens, num_kv_heads, head_dim]
        self.k = torch.randn(shape, generator=generator).to(geometry.dtype)
        self.v = torch.randn(shape, generator=generator).to(geometry.dtype)
        self.dest_k = torch.zeros_like(self.k)
        self.dest_v = torch.zeros_like(self.v)
        self._outcomes: dict[str, str] = {}  # request id -> "complete" or the failure
        self._lock = threading.Lock()
        self.receiver = KVReceiver(geometry, write=self._write, on_complete=self._completed,
                                   on_failed=self._failed, lease_s=PUSH_TIMEOUT_S)
        self._servers: list[grpc.Server] = []
        self._channels: list[grpc.Channel] = []
        self._rings = shm.RingPool() if shm.supported() else None
        try:
            for servicer in (self.receiver, _Sink()):
                server, channel = _serve(servicer)
                self._servers.append(server)
                self._channels.append(channel)
        except BaseException:
            self.close()
            raise

    def bytes_of(self, num_tokens: int) -> int:
        return num_tokens * self.geometry.bytes_per_token

    def chunks(self, num_tokens: int, transfer_id: str = "stages") -> Iterator[kvtransfer_pb2.KVChunk]:
        """The first num_tokens tokens' KV as the prefill worker encodes it, lazily."""
        return iter_chunks(
            transfer_id=transfer_id, attempt=0, geometry=self.geometry, token_start=0,
            token_end=num_tokens, first_token_id=1, read_kv=self._read_kv,
        )

    def _read_kv(self, layer_start: int, layer_end: int, token_start: int, token_end: int):
        return (self.k[layer_start:layer_end, token_start:token_end],
                self.v[layer_start:layer_end, token_start:token_end])

    def push(self, num_tokens: int, through_ring: bool = False) -> float:
        """Seconds of one push of num_tokens tokens' KV into the receiver, encode to ack: in the
        gRPC stream, or through a shared-memory ring (as to a decode worker on this host)."""
        transfer_id = f"bench-kv-{next(_transfer_numbers)}"
        self.receiver.expect(transfer_id, transfer_id, 0, num_tokens)
        if through_ring and self._rings is None:
            raise RuntimeError("shared-memory rings need x86-64 and /dev/shm")
        ring = self._rings.acquire() if through_ring else None
        call_done = threading.Event()
        start = time.perf_counter()
        try:
            if ring is None:
                chunks = self.chunks(num_tokens, transfer_id)
            else:
                chunks = iter_ring_push(
                    ring, transfer_id=transfer_id, attempt=0, geometry=self.geometry,
                    token_start=0, token_end=num_tokens, first_token_id=1,
                    read_kv=self._read_kv, timeout_s=PUSH_TIMEOUT_S, call_done=call_done)
            push_kv(self._channels[0], chunks, timeout=PUSH_TIMEOUT_S, done=call_done)
        except grpc.RpcError as exc:
            outcome = f"{exc.code().name} {exc.details()}"
        else:
            outcome = None
        seconds = time.perf_counter() - start
        if ring is not None:
            self._rings.release(ring, reusable=outcome is None)
        with self._lock:
            outcome = self._outcomes.pop(transfer_id, None) or outcome or "no completion reported"
        if outcome != "complete":
            raise RuntimeError(f"request_id={transfer_id}: loopback KV push failed: {outcome}")
        return seconds

    def push_to_sink(self, chunks: Iterable[kvtransfer_pb2.KVChunk]) -> float:
        """Seconds to stream already encoded chunks to the sink: gRPC and protobuf alone."""
        start = time.perf_counter()
        push_kv(self._channels[1], iter(chunks), timeout=PUSH_TIMEOUT_S)
        return time.perf_counter() - start

    def decode_and_write(self, chunks: Iterable[kvtransfer_pb2.KVChunk],
                         num_tokens: int) -> tuple[float, float]:
        """(seconds in decode_chunk, seconds writing into the preallocated tensors)."""
        decode_s = write_s = 0.0
        for chunk in chunks:
            if chunk.layer_end == chunk.layer_start:
                continue  # no KV: a last chunk that carries only the first token
            start = time.perf_counter()
            k, v = decode_chunk(chunk, self.geometry, 0, num_tokens)
            decoded = time.perf_counter()
            self._write("stages", chunk.layer_start, chunk.layer_end, chunk.token_start,
                        chunk.token_end, k, v)
            decode_s += decoded - start
            write_s += time.perf_counter() - decoded
        return decode_s, write_s

    def received_intact(self, num_tokens: int) -> bool:
        return bool(torch.equal(self.dest_k[:, :num_tokens], self.k[:, :num_tokens])
                    and torch.equal(self.dest_v[:, :num_tokens], self.v[:, :num_tokens]))

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        for server in self._servers:
            server.stop(0)
        self.receiver.close()
        if self._rings is not None:
            self._rings.close()

    # -- the receiver's callbacks ---------------------------------------------------------------

    def _write(self, request_id: str, layer_start: int, layer_end: int, token_start: int,
               token_end: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.dest_k[layer_start:layer_end, token_start:token_end].copy_(k)
        self.dest_v[layer_start:layer_end, token_start:token_end].copy_(v)

    def _completed(self, request_id: str, first_token_id: int) -> None:
        with self._lock:
            self._outcomes[request_id] = "complete"

    def _failed(self, request_id: str, err: ChunkError) -> None:
        with self._lock:
            self._outcomes[request_id] = f"{err.reason.value}: {err}"


def wire_geometry() -> KVGeometry:
    num_layers, num_kv_heads, head_dim = WIRE_GEOMETRY
    return KVGeometry(num_layers, num_kv_heads, head_dim, torch.float32)


def measure_wire(config: KVTransferBenchConfig) -> dict:
    geometry = wire_geometry()
    num_tokens = config.wire_bytes // geometry.bytes_per_token
    num_bytes = num_tokens * geometry.bytes_per_token
    rings = shm.supported()
    logger.info("wire: %d tokens of KV (%.1f MB) on loopback, %d repeats", num_tokens,
                num_bytes / 1e6, config.num_repeats)
    wire = LoopbackKV(geometry, num_tokens, seed=config.seed)
    try:
        for through_ring in (False, True)[:1 + rings]:  # warm-up: connection, pages, the ring
            wire.dest_k.zero_()
            wire.dest_v.zero_()
            wire.push(num_tokens, through_ring)
            if not wire.received_intact(num_tokens):
                raise RuntimeError("wire: the KV written by the receiver differs from the KV sent "
                                   f"({'through a ring' if through_ring else 'in the stream'})")
        best = {name: float("inf") for name in ("push", "ring_push", "copy", *STAGES)}
        num_chunks = 0
        for repeat in range(config.num_repeats):
            logger.info("wire: pushes, in-process copy and stages, repeat %d/%d", repeat + 1,
                        config.num_repeats)
            best["push"] = min(best["push"], wire.push(num_tokens))
            if rings:
                best["ring_push"] = min(best["ring_push"],
                                        wire.push(num_tokens, through_ring=True))
            best["copy"] = min(best["copy"], num_bytes / roofline.copy_bytes_per_s(num_bytes))
            start = time.perf_counter()
            chunks = list(wire.chunks(num_tokens))
            best["encode"] = min(best["encode"], time.perf_counter() - start)
            num_chunks = len(chunks)
            best["grpc"] = min(best["grpc"], wire.push_to_sink(chunks))
            decode_s, write_s = wire.decode_and_write(chunks, num_tokens)
            best["decode"], best["write"] = min(best["decode"], decode_s), min(best["write"], write_s)
            del chunks
    finally:
        wire.close()
    stages = {name: {"seconds": best[name], "bytes_per_s": num_bytes / best[name]}
              for name in STAGES}
    result = {
        "geometry": {"num_layers": geometry.num_layers, "num_kv_heads": geometry.num_kv_heads,
                     "head_dim": geometry.head_dim, "dtype": "float32"},
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
        "num_chunks": num_chunks,
        "push_s": best["push"],
        "push_bytes_per_s": num_bytes / best["push"],
        "ring_push_s": best["ring_push"] if rings else None,
        "ring_push_bytes_per_s": num_bytes / best["ring_push"] if rings else None,
        "copy_s": best["copy"],
        "copy_bytes_per_s": num_bytes / best["copy"],
        "stages": stages,
        "bottleneck": max(STAGES, key=lambda name: best[name]),
    }
    result["ratio_push_over_copy"] = result["push_bytes_per_s"] / result["copy_bytes_per_s"]
    result["ratio_ring_push_over_copy"] = div(result["ring_push_bytes_per_s"],
                                              result["copy_bytes_per_s"])
    logger.info("wire: push in the stream %.2f GB/s, through a ring %s GB/s, in-process copy "
                "%.2f GB/s (ratios %.3f, %s); stream stages: %s",
                result["push_bytes_per_s"] / 1e9, fmt(div(result["ring_push_bytes_per_s"], 1e9)),
                result["copy_bytes_per_s"] / 1e9, result["ratio_push_over_copy"],
                fmt(result["ratio_ring_push_over_copy"], 3),
                ", ".join(f"{name} {best[name] * 1e3:.0f} ms" for name in STAGES))
    return result
