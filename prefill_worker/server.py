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
from collections.abc import Callable, Iterator

import grpc

from baton.v1 import kvtransfer_pb2, worker_pb2, worker_pb2_grpc
from baton.wire import GRPC_OPTIONS, finish_to_proto, logprob_to_proto, sampling_from_proto
from baton.worker import WorkerServer, abort_status, load_to_proto
from engine.kv_stream import KVStream, KVStreamClosed
from engine.loop import LoopStopped
from engine.request import InvalidRequestError, RequestOutput
from kvtransfer.codec import KVGeometry
from kvtransfer.compression import check_compression
from kvtransfer.sender import DEFAULT_CHUNK_BYTES, iter_chunks, push_kv

log = logging.getLogger(__name__)


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
        except Exception as exc:  # a bug: still never into gRPC's request-iterator thread
            log.exception("request_id=%s: building KV chunks failed", self.request_id)
            self.stopped = f"building KV chunks failed: {type(exc).__name__}: {exc}"


class PrefillWorker(WorkerServer, worker_pb2_grpc.PrefillServicer):
    role = "prefill"
    service_names = ("baton.v1.Prefill",)

    def __init__(self, *args, kv_push_timeout_s: float = 60.0, kv_compression: str = "none",
                 kv_chunk_bytes: int = DEFAULT_CHUNK_BYTES, **kwargs) -> None:
        """kv_push_timeout_s bounds a push (prefill included) when the router set no deadline."""
        check_compression(kv_compression)
        if kv_chunk_bytes <= 0:
            raise ValueError(f"kv_chunk_bytes must be > 0, got {kv_chunk_bytes}")
        self._kv_push_timeout_s = kv_push_timeout_s
        self._kv_chunk_bytes = kv_chunk_bytes
        self.kv_compression = kv_compression
        self._channels: dict[str, grpc.Channel] = {}
        self._channels_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        mc = self.engine.model_config
        self.geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.engine.kv_dtype)
        self.metrics.declare_kv_transfer_reasons(PUSH_FAILURE_REASONS, ())

    def _add_services(self, server: grpc.Server) -> None:
        worker_pb2_grpc.add_PrefillServicer_to_server(self, server)

    def stop(self, grace: float = 5.0) -> None:
        super().stop(grace)
        with self._channels_lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _channel(self, address: str) -> grpc.Channel:
        with self._channels_lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
                self._channels[address] = channel
            return channel

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
        chunks = iter_chunks(
            transfer_id=request.transfer_id, attempt=request.attempt, geometry=self.geometry,
            token_start=request.num_skip_tokens, token_end=len(prompt), stream=stream,
            first_token_id=push.first_token_id, chunk_bytes=self._kv_chunk_bytes,
            compression=self.kv_compression, wait_timeout_s=timeout)
        try:
            try:
                num_bytes = push_kv(self._channel(request.decode_address), push.guard(chunks),
                                    timeout=timeout, on_chunk=self.metrics.kv_transfer_bytes.inc,
                                    cancel_with=context)
                failure = None
            except grpc.RpcError as exc:  # the decode worker's answer, or this call's end
                num_bytes, failure = 0, exc
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
