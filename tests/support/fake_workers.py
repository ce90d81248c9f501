"""Fake decode and prefill workers: real gRPC servers on loopback that speak baton.v1 Decode,
Prefill and KVTransfer, generating scripted tokens instead of running a model.

A script maps (prompt_token_ids, sampling) to the tokens a model would produce; the fakes apply
the engine's stopping rules (EOS unless ignore_eos, stop_token_ids, max_tokens) with
`expected_output`, which tests use to know what the router must return; when the request asks for
logprobs, every token carries `fake_logprob(position, token, k)`. The REMOTE flow is the
real protocol: D answers Reserved, P "prefills" and pushes one KVChunk (last=True, carrying the
first token) to D's KVTransfer.Push at decode_address, then replies with the first token; D then
streams tokens 2..N. Knobs in FakeBehavior inject delays and failures; every request, abort and
cancellation is recorded for assertions.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.wire import finish_to_proto, logprob_to_proto, sampling_from_proto
from engine.request import FinishReason, SamplingParams, TokenLogprob
from kvtransfer.codec import checksum
from router.registry import WorkerInfo

Script = Callable[[Sequence[int], SamplingParams], list[int]]


def reply_script(token_ids: Sequence[int]) -> Script:
    """Every prompt gets the same reply."""
    reply = list(token_ids)
    return lambda prompt, sampling: list(reply)


def expected_output(script: Script, prompt: Sequence[int], sampling: SamplingParams,
                    eos_token_ids: frozenset[int]) -> tuple[list[int], FinishReason]:
    """The tokens and finish reason an engine would report for `script`'s output."""
    out: list[int] = []
    for token in script(prompt, sampling):
        out.append(token)
        if (token in eos_token_ids and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            return out, FinishReason.STOP
        if len(out) >= sampling.max_tokens:
            return out, FinishReason.LENGTH
    return out, FinishReason.LENGTH  # the script ran dry: treat as the context limit


def fake_logprob(position: int, token_id: int, k: int) -> TokenLogprob:
    """A scripted logprob (exact in float32) for output token `position`, with k alternatives:
    the token itself first, then the lowest other ids, less and less likely."""
    logprob = -0.25 * (position % 4) - 0.125
    others = [t for t in range(k + 1) if t != token_id][: max(k - 1, 0)]
    top = ((token_id, logprob),) + tuple((t, logprob - 1 - j) for j, t in enumerate(others))
    return TokenLogprob(token_id, logprob, top[:k])


def fake_logprobs(token_ids: Sequence[int], k: int | None, start: int = 0) -> list:
    """The TokenLogprob messages for token_ids at output positions start.. (none if k is None)."""
    if k is None:
        return []
    return [logprob_to_proto(fake_logprob(start + i, t, k)) for i, t in enumerate(token_ids)]


@dataclass
class FakeBehavior:
    token_delay_s: float = 0.0  # D: pause before each TokenBatch
    prefill_delay_s: float = 0.0  # P: pause before pushing
    tokens_per_batch: int = 1
    finish_in_separate_batch: bool = False  # D: a last empty TokenBatch carries the reason
    num_cached_tokens: int = 0  # D: what Reserved reports
    num_cached_tokens_local: int = 0  # D: what a LOCAL request's first TokenBatch reports
    generate_error: tuple[grpc.StatusCode, str] | None = None  # D: refuse Generate up front
    prefill_error: tuple[grpc.StatusCode, str] | None = None  # P: fail Prefill
    fail_after_tokens: int | None = None  # D: UNAVAILABLE after this many tokens
    # D: generate_error and fail_after_tokens apply only to the requests this accepts (all if None)
    fails: Callable[[worker_pb2.DecodeRequest], bool] | None = None
    kv_wait_s: float = 10.0  # D: lease on a REMOTE reservation


class _FakeServer:
    role = ""

    def __init__(self, script: Script, *, worker_id: str, eos_token_ids: Sequence[int],
                 behavior: FakeBehavior | None = None, host: str = "127.0.0.1") -> None:
        self.script = script
        self.worker_id = worker_id
        self.eos_token_ids = frozenset(eos_token_ids)
        self.behavior = behavior or FakeBehavior()
        self.host = host
        self.address = ""
        self.requests: list = []  # every request message received
        self.aborts: list[str] = []  # request ids of Abort RPCs
        self.cancelled: list[str] = []  # request ids whose stream the router left early
        self.received_at: dict[str, float] = {}  # request id -> when its request arrived
        self.first_token_at: dict[str, float] = {}  # request id -> when its first token left
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self._add_services(self._server)

    def _add_services(self, server: grpc.Server) -> None:
        raise NotImplementedError

    def start(self) -> _FakeServer:
        port = self._server.add_insecure_port(f"{self.host}:0")
        self._server.start()
        self.address = f"{self.host}:{port}"
        return self

    def stop(self, grace: float | None = 0.5) -> None:
        self._server.stop(grace).wait()

    def info(self, state: str = "ready", num_running: int = 0, num_waiting: int = 0) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, role=self.role, state=state,
                          grpc_address=self.address, metrics_url=f"http://{self.host}:9/metrics",
                          pid=os.getpid(), node="fake", num_running=num_running,
                          num_waiting=num_waiting)

    def output(self, prompt: Sequence[int], sampling: SamplingParams) -> tuple[list[int], FinishReason]:
        return expected_output(self.script, prompt, sampling, self.eos_token_ids)

    def _record(self, bucket: list, value) -> None:
        with self._lock:
            bucket.append(value)


class FakeDecodeWorker(_FakeServer, worker_pb2_grpc.DecodeServicer,
                       kvtransfer_pb2_grpc.KVTransferServicer):
    role = "decode"

    def __init__(self, *args, **kwargs) -> None:
        self._transfers: dict[str, tuple[threading.Event, list[int]]] = {}
        self._abort_events: dict[str, threading.Event] = {}
        self.pushes: list[kvtransfer_pb2.KVChunk] = []
        super().__init__(*args, **kwargs)

    def _add_services(self, server: grpc.Server) -> None:
        worker_pb2_grpc.add_DecodeServicer_to_server(self, server)
        kvtransfer_pb2_grpc.add_KVTransferServicer_to_server(self, server)

    def Generate(self, request: worker_pb2.DecodeRequest, context: grpc.ServicerContext):
        self._record(self.requests, request)
        rid = request.request_id
        self.received_at[rid] = time.monotonic()
        b = self.behavior
        fails = b.fails is None or b.fails(request)
        if b.generate_error is not None and fails:
            context.abort(*b.generate_error)
        sampling = sampling_from_proto(request.sampling)
        tokens, reason = self.output(request.prompt_token_ids, sampling)
        aborted = threading.Event()
        done = threading.Event()
        with self._lock:
            self._abort_events[rid] = aborted

        def on_end() -> None:
            if not done.is_set():
                self._record(self.cancelled, rid)

        context.add_callback(on_end)
        if request.prefill_mode == worker_pb2.PREFILL_MODE_REMOTE:
            arrived = threading.Event()
            first: list[int] = []
            with self._lock:
                self._transfers[request.transfer_id] = (arrived, first)
            yield worker_pb2.DecodeResponse(reserved=worker_pb2.Reserved(
                transfer_id=request.transfer_id, num_cached_tokens=b.num_cached_tokens,
                num_blocks=-(-len(request.prompt_token_ids) // 16)))
            deadline = time.monotonic() + b.kv_wait_s
            while not arrived.wait(0.05):
                if aborted.is_set() or not context.is_active():
                    return
                if time.monotonic() > deadline:
                    context.abort(grpc.StatusCode.ABORTED, "KV transfer lease expired")
            assert first == tokens[:1], (first, tokens[:1])
            tokens_to_send, position = tokens[1:], 1
        else:  # a migrated request resumes after the tokens the failed worker streamed
            resumed = list(request.output_token_ids)
            assert resumed == tokens[:len(resumed)], (resumed, tokens[:len(resumed)])
            tokens_to_send, position = tokens[len(resumed):], len(resumed)
        sent = 0
        step = max(1, b.tokens_per_batch)
        batches = [tokens_to_send[i:i + step] for i in range(0, len(tokens_to_send), step)]
        if not batches or b.finish_in_separate_batch:
            batches.append([])
        for i, batch in enumerate(batches):
            if b.token_delay_s:
                time.sleep(b.token_delay_s)
            if aborted.is_set():
                context.abort(grpc.StatusCode.ABORTED, "aborted")
            if b.fail_after_tokens is not None and sent >= b.fail_after_tokens and fails:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
            last = i == len(batches) - 1
            if last:
                done.set()
            logprobs = fake_logprobs(batch, sampling.logprobs, position + sent)
            sent += len(batch)
            local = request.prefill_mode != worker_pb2.PREFILL_MODE_REMOTE
            if local and i == 0:
                self.first_token_at[rid] = time.monotonic()
            yield worker_pb2.DecodeResponse(tokens=worker_pb2.TokenBatch(
                token_ids=batch, finish_reason=finish_to_proto(reason if last else None),
                logprobs=logprobs,
                num_cached_tokens=b.num_cached_tokens_local if local and i == 0 else 0))

    def Abort(self, request: worker_pb2.WorkerAbortRequest, context: grpc.ServicerContext):
        self._record(self.aborts, request.request_id)
        with self._lock:
            event = self._abort_events.get(request.request_id)
        if event is not None:
            event.set()
        return worker_pb2.WorkerAbortResponse(found=event is not None)

    def GetLoad(self, request: worker_pb2.LoadRequest, context: grpc.ServicerContext):
        return worker_pb2.Load(num_total_blocks=1000, num_free_blocks=1000)

    def Push(self, request_iterator, context: grpc.ServicerContext):
        num_bytes = 0
        for chunk in request_iterator:
            self._record(self.pushes, chunk)
            if checksum(chunk.payload) != chunk.crc32c:
                context.abort(grpc.StatusCode.DATA_LOSS, "checksum mismatch")
            num_bytes += len(chunk.payload)
            if chunk.last:
                with self._lock:
                    transfer = self._transfers.pop(chunk.transfer_id, None)
                if transfer is None:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"unknown transfer {chunk.transfer_id}")
                arrived, first = transfer
                first.append(chunk.first_token_id)
                arrived.set()
        return kvtransfer_pb2.PushAck(num_bytes=num_bytes)


class FakePrefillWorker(_FakeServer, worker_pb2_grpc.PrefillServicer):
    role = "prefill"

    def _add_services(self, server: grpc.Server) -> None:
        worker_pb2_grpc.add_PrefillServicer_to_server(self, server)

    def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.ServicerContext):
        self._record(self.requests, request)
        b = self.behavior
        if b.prefill_delay_s:
            time.sleep(b.prefill_delay_s)
        if b.prefill_error is not None:
            context.abort(*b.prefill_error)
        sampling = sampling_from_proto(request.sampling)
        tokens, reason = self.output(request.prompt_token_ids, sampling)
        payload = uuid.uuid4().bytes * 4
        chunk = kvtransfer_pb2.KVChunk(
            transfer_id=request.transfer_id, attempt=request.attempt, layer_start=0, layer_end=1,
            token_start=request.num_skip_tokens, token_end=len(request.prompt_token_ids),
            dtype="float32", num_kv_heads=1, head_dim=1, payload=payload,
            crc32c=checksum(payload), last=True, first_token_id=tokens[0])
        with grpc.insecure_channel(request.decode_address) as channel:
            kvtransfer_pb2_grpc.KVTransferStub(channel).Push(iter([chunk]), timeout=10)
        reply = worker_pb2.PrefillResponse(
            first_token_id=tokens[0],
            finish_reason=finish_to_proto(reason if len(tokens) == 1 else None),
            num_kv_bytes=len(payload))
        for logprob in fake_logprobs(tokens[:1], sampling.logprobs):
            reply.first_token_logprob.CopyFrom(logprob)
        self.first_token_at[request.request_id] = time.monotonic()
        return reply

    def Abort(self, request: worker_pb2.WorkerAbortRequest, context: grpc.ServicerContext):
        self._record(self.aborts, request.request_id)
        return worker_pb2.WorkerAbortResponse(found=False)

    def GetLoad(self, request: worker_pb2.LoadRequest, context: grpc.ServicerContext):
        return worker_pb2.Load()


@dataclass
class FakeCluster:
    """Fake workers started together; `infos()` is what a StaticWorkerDirectory should hold."""

    decode: list[FakeDecodeWorker] = field(default_factory=list)
    prefill: list[FakePrefillWorker] = field(default_factory=list)

    @classmethod
    def start(cls, script: Script, eos_token_ids: Sequence[int], *, num_decode: int = 1,
              num_prefill: int = 1, behavior: FakeBehavior | None = None) -> FakeCluster:
        cluster = cls(
            decode=[FakeDecodeWorker(script, worker_id=f"decode-{i}", eos_token_ids=eos_token_ids,
                                     behavior=behavior).start() for i in range(num_decode)],
            prefill=[FakePrefillWorker(script, worker_id=f"prefill-{i}",
                                       eos_token_ids=eos_token_ids, behavior=behavior).start()
                     for i in range(num_prefill)],
        )
        return cluster

    def infos(self) -> list[WorkerInfo]:
        return [w.info() for w in (*self.decode, *self.prefill)]

    def stop(self) -> None:
        for worker in (*self.decode, *self.prefill):
            worker.stop()


