"""Decode worker: Decode.Generate, Decode.Abort, Decode.GetLoad and KVTransfer.Push on one port.

Request lifecycle here:
  LOCAL:  Generate -> engine.add_request -> tokens stream back as steps produce them; the first
          TokenBatch carries the prompt tokens found in the prefix cache (num_cached_tokens). A
          request another decode worker started comes with the tokens it generated
          (output_token_ids): they are computed after the prompt and generation resumes.
  REMOTE: Generate -> engine.reserve (the prompt's cached blocks, new blocks for the rest) +
          receiver.expect (lease) -> first message Reserved (num_cached_tokens) -> a prefill worker
          pushes the KV of the uncached tokens (KVTransfer.Push, validated, written into the
          reserved blocks) -> the last chunk commits the request with its first token ->
          tokens 2..N stream back. A failed or expired transfer frees the blocks and ends the
          stream with an error status.
  The stream ends with a TokenBatch carrying the finish reason. If the router goes away or calls
  Abort, the request is aborted in the engine and its blocks are freed.
"""

from __future__ import annotations

import logging
import queue

import grpc

from baton.v1 import kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.wire import finish_to_proto, logprob_to_proto, sampling_from_proto
from baton.worker import WorkerServer, abort_status, load_to_proto
from engine.loop import LoopStopped, RequestFailed
from engine.request import InvalidRequestError, RequestOutput
from kvtransfer.codec import ChunkError, KVGeometry
from kvtransfer.receiver import FAILURE_REASONS, REFUSAL_REASONS, KVReceiver

log = logging.getLogger(__name__)


class DecodeWorker(WorkerServer, worker_pb2_grpc.DecodeServicer):
    role = "decode"
    service_names = ("baton.v1.Decode", "baton.v1.KVTransfer")

    def __init__(self, *args, kv_lease_s: float = 30.0, **kwargs) -> None:
        self._kv_lease_s = kv_lease_s
        super().__init__(*args, **kwargs)

    def _add_services(self, server: grpc.Server) -> None:
        mc = self.engine.model_config
        metrics = self.metrics
        metrics.declare_kv_transfer_reasons([r.value for r in FAILURE_REASONS],
                                            [r.value for r in REFUSAL_REASONS])
        self.receiver = KVReceiver(
            KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.engine.kv_dtype),
            write=lambda *args: self.loop.call(self.engine.write_kv, *args),
            on_complete=lambda rid, token: self.loop.call(self.engine.commit, rid, token),
            on_failed=self._transfer_failed,
            on_bytes=metrics.kv_transfer_bytes.inc,
            on_seconds=metrics.kv_transfer_seconds.observe,
            on_failure=lambda reason: metrics.count_kv_transfer_failure(reason.value),
            on_refusal=lambda reason: metrics.count_kv_transfer_refused_push(reason.value),
            lease_s=self._kv_lease_s,
            vocab_size=mc.vocab_size,
        )
        worker_pb2_grpc.add_DecodeServicer_to_server(self, server)
        kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(self.receiver, server)

    def stop(self, grace: float = 5.0) -> None:
        super().stop(grace)
        self.receiver.close()

    def _transfer_failed(self, request_id: str, err: ChunkError) -> None:
        self.loop.call(self.engine.abort, request_id)
        self.loop.fail(request_id, RequestFailed(f"KV transfer failed ({err.reason.value}): {err}"))

    # -- Decode service ---------------------------------------------------------------------

    def Generate(self, request: worker_pb2.DecodeRequest, context: grpc.ServicerContext):
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        remote = request.prefill_mode == worker_pb2.PREFILL_MODE_REMOTE
        try:
            sampling = sampling_from_proto(request.sampling)
        except InvalidRequestError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not rid or (remote and not request.transfer_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "request_id (and transfer_id for remote prefill) must be set")
        if remote and request.output_token_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "output_token_ids (a resumed request) need prefill_mode LOCAL")
        try:
            outputs = self.loop.subscribe(rid)
        except ValueError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        finished = False

        def on_done() -> None:  # the RPC ended: completed, cancelled, or the router went away
            if not finished:
                log.info("request_id=%s: stream ended early, aborting", rid)
                self._abort(rid)

        context.add_callback(on_done)
        try:
            if remote:
                num_cached = self.loop.call(self.engine.reserve, rid, prompt, sampling)
                try:
                    self.receiver.expect(request.transfer_id, rid, num_cached, len(prompt))
                except ValueError:  # a transfer id in use: give the reservation back
                    self.loop.call(self.engine.abort, rid)
                    raise InvalidRequestError(
                        f"transfer_id {request.transfer_id} is already in use", "transfer_id")
                log.info("request_id=%s: reserved KV for %d prompt tokens (%d cached), transfer %s",
                         rid, len(prompt), num_cached, request.transfer_id)
                # the prefill worker sends only what follows the cached (full) blocks
                self.metrics.kv_transfer_skipped_blocks.inc(num_cached // self.engine.block_size)
                yield worker_pb2.DecodeResponse(reserved=worker_pb2.Reserved(
                    transfer_id=request.transfer_id, num_cached_tokens=num_cached,
                    num_blocks=-(-len(prompt) // self.engine.block_size)))
            else:
                self.loop.call(lambda: self.engine.add_request(
                    rid, prompt, sampling, output_token_ids=request.output_token_ids))
        except Exception as exc:  # noqa: BLE001  refused up front: nothing is left allocated
            self.loop.unsubscribe(rid)
            finished = True
            code, message = abort_status(exc)
            log.info("request_id=%s: refused: %s", rid, message)
            context.abort(code, message)
        while True:
            try:
                event = outputs.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(event, RequestOutput):
                # Set before the last yield: the router may close the stream as soon as it has it.
                finished = event.finished
                yield worker_pb2.DecodeResponse(tokens=worker_pb2.TokenBatch(
                    token_ids=event.new_token_ids,
                    finish_reason=finish_to_proto(event.finish_reason),
                    logprobs=[logprob_to_proto(lp) for lp in event.logprobs or ()],
                    num_cached_tokens=event.num_cached_tokens or 0))
                if finished:
                    return
            else:
                finished = True
                code = (grpc.StatusCode.UNAVAILABLE if isinstance(event, LoopStopped)
                        else grpc.StatusCode.ABORTED)
                context.abort(code, str(event))

    def Abort(self, request: worker_pb2.WorkerAbortRequest, context: grpc.ServicerContext):
        return worker_pb2.WorkerAbortResponse(found=self._abort(request.request_id))

    def GetLoad(self, request: worker_pb2.LoadRequest, context: grpc.ServicerContext):
        return load_to_proto(self.load())

    def _abort(self, request_id: str) -> bool:
        self.receiver.cancel_request(request_id)
        try:
            found = self.loop.call(self.engine.abort, request_id)
        except LoopStopped:
            found = False
        self.loop.fail(request_id, RequestFailed("aborted"))
        return bool(found)

