"""Prefill worker: Prefill.Prefill, Prefill.Abort, Prefill.GetLoad.

Request lifecycle here: Prefill -> engine.add_request(prefill_only) + engine.stream_kv, and at once
a push to the decode worker at decode_address: the KV of positions [num_skip_tokens, prompt length)
goes out layer by layer as the engine computes it (layer l sent while layer l + 1 is computed;
kvtransfer/sender.py) -> the step that finishes the prompt yields the first token, sent in the
last chunk -> the blocks are released -> the reply carries the first token. Whatever happens (push
failure, preemption, abort, the router gone), the push stops and the blocks are released.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from baton.cluster_token import token_channel
from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.wire import finish_to_proto, logprob_to_proto, sampling_from_proto
from baton.worker import WorkerServer, abort_status, load_to_proto
from engine.kv_stream import KVStream, KVStreamClosed
from engine.loop import LoopStopped
from engine.request import InvalidRequestError, RequestOutput
from kvtransfer import shm
from kvtransfer.codec import KVGeometry
from kvtransfer.compression import check_compression
from kvtransfer.sender import DEFAULT_CHUNK_BYTES, iter_chunks, iter_ring_push, push_kv

log = logging.getLogger(__name__)


# A decode worker that could not open this worker's rings is asked again after this long.
RING_RECHECK_S = 60.0

# baton_kv_transfer_failures_total{reason} on a prefill worker: the gRPC status the decode worker
# answered the push with, or "stopped" when this side ended it (the request was preempted or
# failed, or the router went away).
PUSH_FAILURE_REASONS = ("stopped", "unavailable", "deadline_exceeded", "invalid_argument",
                        "not_found", "failed_precondition", "cancelled")


class _PushStopped(RuntimeError):
    """The first token will not come (the request failed, or the router went away)."""


class _GuardedPush:
    """What one push shares with gRPC's request-iterator thread, which must see no exception:
    guard(chunks) ends the iteration early on a stop on this side (the stream closed, a wait
    timed out, no first token, a bug), so the decode worker fails the transfer, and keeps the
    reason in `stopped`; first_token_id() waits for the request's first output and keeps it in
    `first`, for the reply."""

    def __init__(self, request_id: str, first_output: Callable[[], RequestOutput]) -> None:
        self.request_id = request_id
        self._first_output = first_output
        self.stopped: str | None = None
        self.first: RequestOutput | None = None

    def first_token_id(self) -> int:
        self.first = self._first_output()
        return self.first.new_token_ids[0]

    def guard(self, chunks: Iterator[kvtransfer_pb2.KVChunk]) -> Iterator[kvtransfer_pb2.KVChunk]:
        try:
            yield from chunks
        except (KVStreamClosed, TimeoutError, _PushStopped) as exc:
            self.stopped = str(exc)
        except shm.RingError:
            pass  # the decode worker failed the transfer; its answer to the push says why
        except Exception as exc:  # a bug: still never into gRPC's request-iterator thread
            log.exception("request_id=%s: building KV chunks failed", self.request_id)
            self.stopped = f"building KV chunks failed: {type(exc).__name__}: {exc}"


class PrefillWorker(WorkerServer, worker_pb2_grpc.PrefillServicer):
    role = "prefill"
    service_names = ("baton.v1.Prefill",)

    def __init__(self, *args, kv_push_timeout_s: float = 60.0, kv_compression: str = "none",
                 kv_chunk_bytes: int = DEFAULT_CHUNK_BYTES, kv_shared_memory: bool = True,
                 kv_ring_slot_bytes: int = shm.DEFAULT_SLOT_BYTES, **kwargs) -> None:
        """kv_push_timeout_s bounds a push (prefill included) when the router set no deadline.
        kv_shared_memory: with kv_compression "none", push to a decode worker on this host
        through shared-memory rings (kvtransfer/shm.py) once it answers that it can open them;
        otherwise, and to other hosts, in the Push stream. A ring's slots hold kv_ring_slot_bytes
        (one token of one layer at least), as a chunk in the stream holds kv_chunk_bytes."""
        check_compression(kv_compression)
        for name, value in (("kv_chunk_bytes", kv_chunk_bytes),
                            ("kv_ring_slot_bytes", kv_ring_slot_bytes)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self._kv_push_timeout_s = kv_push_timeout_s
        self._kv_chunk_bytes = kv_chunk_bytes
        self.kv_compression = kv_compression
        self._channels: dict[str, grpc.Channel] = {}
        self._channels_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        mc = self.engine.model_config
        self.geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.engine.kv_dtype)
        self.metrics.declare_kv_transfer_reasons(PUSH_FAILURE_REASONS, ())
        self._rings: shm.RingPool | None = None
        # decode address -> (it can open this worker's rings, time.monotonic() of its answer)
        self._ring_ok: dict[str, tuple[bool, float]] = {}
        if kv_shared_memory and kv_compression == "none" and shm.supported():
            shm.sweep_stale()
            self._rings = shm.RingPool(
                max(kv_ring_slot_bytes, self.geometry.bytes_per_token_layer))

    def _add_services(self, server: grpc.Server) -> None:
        worker_pb2_grpc.add_PrefillServicer_to_server(self, server)

    def stop(self, grace: float = 5.0) -> None:
        super().stop(grace)
        with self._channels_lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
        if self._rings is not None:
            self._rings.close()

    def _channel(self, address: str) -> grpc.Channel:
        with self._channels_lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = token_channel(address, self.cluster_token, self.tls)
                self._channels[address] = channel
            return channel

    def _ring_for(self, address: str, timeout: float) -> shm.Ring | None:
        """A ring for a push to the decode worker at address, or None to push in the stream: rings
        are off here, all in use, or /dev/shm is full, or that worker cannot open them (asked on
        the first push, and again RING_RECHECK_S after a no or after a refused push)."""
        if self._rings is None:
            return None
        answer = self._ring_ok.get(address)
        if answer is not None and not answer[0] and time.monotonic() - answer[1] < RING_RECHECK_S:
            return None
        try:
            ring = self._rings.acquire()
        except OSError as exc:  # e.g. a small /dev/shm, full
            log.warning("no shared-memory ring for a push to %s (%s); pushing KV in the stream",
                        address, exc)
            return None
        if ring is None or (answer is not None and answer[0]):
            return ring
        try:
            reply = kvtransfer_pb2_grpc.KVTransferStub(self._channel(address)).CheckRing(
                kvtransfer_pb2.RingCheck(ring=ring.name), timeout=min(10.0, timeout))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a worker without rings
                reply = kvtransfer_pb2.RingCheckReply(ok=False, detail="no CheckRing there")
            else:  # no answer now: ask again on the next push
                log.warning("decode worker %s did not answer the ring check (%s); pushing KV "
                            "in the stream", address, exc.code().name)
                self._rings.release(ring, reusable=True)
                return None
        self._ring_ok[address] = (reply.ok, time.monotonic())
        log.info("decode worker %s: KV pushed %s", address,
                 "through shared memory" if reply.ok else f"in the stream ({reply.detail})")
        if not reply.ok:
            self._rings.release(ring, reusable=True)
            return None
        return ring

    def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.ServicerContext):
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        try:
            sampling = sampling_from_proto(request.sampling)
        except InvalidRequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not (rid and request.transfer_id and request.decode_address):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "request_id, transfer_id and decode_address must be set")
        if not 0 <= request.num_skip_tokens <= len(prompt):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"num_skip_tokens must be in [0, {len(prompt)}], "
                          f"got {request.num_skip_tokens}")
        try:
            outputs = self.loop.subscribe(rid)
        except ValueError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))

        def add_streaming() -> KVStream:  # one call: no step may run between the two
            self.engine.add_request(rid, prompt, sampling, prefill_only=True)
            return self.engine.stream_kv(rid)

        try:
            stream = self.loop.call(add_streaming)
        except Exception as exc:  # noqa: BLE001  refused up front, with the status abort_status picks
            self.loop.unsubscribe(rid)
            with contextlib.suppress(LoopStopped):  # the call may still run after a timeout
                self.loop.call(self.engine.abort, rid)
            code, message = abort_status(exc)
            context.abort(code, message)
        timeout = context.time_remaining() or self._kv_push_timeout_s
        push = _GuardedPush(rid, lambda: self._first_output(outputs, context))
        num_bytes = 0

        def count(n: int) -> None:
            nonlocal num_bytes
            num_bytes += n
            self.metrics.kv_transfer_bytes.inc(n)

        kv = {"transfer_id": request.transfer_id, "attempt": request.attempt,
              "geometry": self.geometry, "token_start": request.num_skip_tokens,
              "token_end": len(prompt), "stream": stream, "first_token_id": push.first_token_id,
              "wait_timeout_s": timeout, "on_bytes": count}
        ring, failure = None, None
        try:
            ring = self._ring_for(request.decode_address, timeout)
            call_done = threading.Event()
            if ring is None:
                chunks = iter_chunks(chunk_bytes=self._kv_chunk_bytes,
                                     compression=self.kv_compression, **kv)
            else:
                chunks = iter_ring_push(ring, timeout_s=timeout, call_done=call_done, **kv)
            try:
                push_kv(self._channel(request.decode_address), push.guard(chunks),
                        timeout=timeout, cancel_with=context, done=call_done)
            except grpc.RpcError as exc:  # the decode worker's answer, or this call's end
                failure = exc
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and ring is not None:
                    self._ring_ok.pop(request.decode_address, None)  # ask again next time
            if push.stopped is not None or failure is not None:
                self.metrics.count_kv_transfer_failure(
                    "stopped" if push.stopped is not None else failure.code().name.lower())
            if push.first is None and not context.is_active():
                return worker_pb2.PrefillResponse()  # the router went away; nothing to answer
            if push.stopped is not None or failure is not None:
                why = push.stopped or f"KV push to the decode worker failed: {failure.details()}"
                log.warning("request_id=%s: push to %s stopped: %s", rid,
                            request.decode_address, why)
                context.abort(grpc.StatusCode.UNAVAILABLE, why)
            first = push.first
            log.info("request_id=%s: prefilled %d tokens, pushed %d KV bytes", rid, len(prompt),
                     num_bytes)
            reply = worker_pb2.PrefillResponse(
                first_token_id=first.new_token_ids[0],
                finish_reason=finish_to_proto(first.finish_reason),
                num_kv_bytes=num_bytes,
            )
            if first.logprobs:
                reply.first_token_logprob.CopyFrom(logprob_to_proto(first.logprobs[0]))
            return reply
        finally:
            self.loop.unsubscribe(rid)
            try:
                self.loop.call(self.engine.abort, rid)  # frees the held blocks in any state
            except LoopStopped:
                pass
            if ring is not None:  # reused only if the decode worker is done with every slot
                self._rings.release(ring, reusable=failure is None and push.stopped is None)

    @staticmethod
    def _first_output(outputs: queue.SimpleQueue, context: grpc.ServicerContext) -> RequestOutput:
        """Wait for the request's first output; raises _PushStopped if the request fails or the
        router goes away first."""
        while True:
            try:
                event = outputs.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    raise _PushStopped("the router went away") from None
                continue
            if not isinstance(event, RequestOutput):
                raise _PushStopped(str(event))
            return event

    def Abort(self, request: worker_pb2.WorkerAbortRequest, context: grpc.ServicerContext):
        try:
            found = self.loop.call(self.engine.abort, request.request_id)
        except LoopStopped:
            found = False
        return worker_pb2.WorkerAbortResponse(found=bool(found))

    def GetLoad(self, request: worker_pb2.LoadRequest, context: grpc.ServicerContext):
        return load_to_proto(self.load())
