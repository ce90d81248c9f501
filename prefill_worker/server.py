"""Prefill worker: Prefill.Prefill, Prefill.Abort, Prefill.GetLoad.

Request lifecycle here: Prefill -> engine.add_request(prefill_only) -> the step that finishes the
prompt yields the first token; the request keeps its blocks -> the KV of positions
[num_skip_tokens, prompt length) is pushed to the decode worker at decode_address, layer by layer,
the first token in the last chunk -> the blocks are released -> the reply carries the first token.
Whatever happens (push failure, abort, the router gone), the blocks are released.
"""

from __future__ import annotations

import logging
import queue
import threading

import grpc

from baton.v1 import worker_pb2, worker_pb2_grpc
from baton.wire import GRPC_OPTIONS, finish_to_proto, logprob_to_proto, sampling_from_proto
from baton.worker import WorkerServer, abort_status, load_to_proto
from engine.loop import LoopStopped
from engine.request import InvalidRequestError, RequestOutput
from kvtransfer.codec import KVGeometry
from kvtransfer.sender import iter_chunks, push_kv

log = logging.getLogger(__name__)


class PrefillWorker(WorkerServer, worker_pb2_grpc.PrefillServicer):
    role = "prefill"
    service_names = ("baton.v1.Prefill",)

    def __init__(self, *args, kv_push_timeout_s: float = 60.0, **kwargs) -> None:
        self._kv_push_timeout_s = kv_push_timeout_s
        self._channels: dict[str, grpc.Channel] = {}
        self._channels_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        mc = self.engine.model_config
        self.geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.engine.kv_dtype)

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
        try:
            self.loop.call(self.engine.add_request, rid, prompt, sampling, prefill_only=True)
        except Exception as exc:  # noqa: BLE001  refused up front, with the status abort_status picks
            self.loop.unsubscribe(rid)
            code, message = abort_status(exc)
            context.abort(code, message)
        try:
            first = self._wait_first_token(rid, outputs, context)
            if first is None:
                return worker_pb2.PrefillResponse()  # the router went away; nothing to send
            chunks = iter_chunks(
                transfer_id=request.transfer_id, attempt=request.attempt, geometry=self.geometry,
                token_start=request.num_skip_tokens, token_end=len(prompt),
                read_kv=lambda l0, l1, t0, t1: self.loop.call(self.engine.read_kv, rid, l0, l1, t0, t1),
                first_token_id=first.new_token_ids[0],
            )
            try:
                num_bytes = push_kv(self._channel(request.decode_address), chunks,
                                    timeout=self._kv_push_timeout_s,
                                    on_chunk=self.metrics.kv_transfer_bytes.inc)
            except grpc.RpcError as exc:
                log.warning("request_id=%s: KV push to %s failed: %s", rid,
                            request.decode_address, exc.details())
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"KV push to the decode worker failed: {exc.details()}")
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

    def _wait_first_token(self, rid: str, outputs: queue.SimpleQueue,
                          context: grpc.ServicerContext) -> RequestOutput | None:
        while True:
            try:
                event = outputs.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return None
                continue
            if isinstance(event, RequestOutput):
                return event
            context.abort(grpc.StatusCode.UNAVAILABLE, str(event))

    def Abort(self, request: worker_pb2.WorkerAbortRequest, context: grpc.ServicerContext):
        try:
            found = self.loop.call(self.engine.abort, request.request_id)
        except LoopStopped:
            found = False
        return worker_pb2.WorkerAbortResponse(found=bool(found))

    def GetLoad(self, request: worker_pb2.LoadRequest, context: grpc.ServicerContext):
        return load_to_proto(self.load())
