"""One request's trip through the workers: the router side of DESIGN §2.

    plan  = least-loaded D (+ P when a prefill worker is ready)            (router.routing)
    REMOTE: D.Generate(prefill_mode=REMOTE, transfer_id) -> first message Reserved(num_cached)
            P.Prefill(prompt, transfer_id, decode_address=D, num_skip_tokens=num_cached)
              -> first token, emitted at once; P pushed the KV to D before answering
            D streams TokenBatch(tokens 2..N) until one carries the finish reason
    LOCAL:  D.Generate(prefill_mode=LOCAL) streams every token (colocated, or fallback); the first
            TokenBatch carries num_cached_tokens (the prompt tokens D's prefix cache held)

Failure handling, all before the client has seen a token unless noted:
  - P fails (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, ...): the REMOTE attempt on D is cancelled
    (D frees the reservation) and the request is prefilled by another ready P (a new REMOTE
    attempt on the same D), or, when none is left or that one fails too, locally on the same D.
  - D is UNAVAILABLE: another ready D is tried (up to `max_attempts`).
  - INVALID_ARGUMENT / RESOURCE_EXHAUSTED from a worker become 400 / 429 for the client.
  - D becomes UNAVAILABLE after tokens reached the client (it died mid-stream): the request
    migrates. Another D gets it LOCAL with the tokens generated so far (output_token_ids), computes
    them after the prompt and resumes: the client's stream goes on with no token lost or repeated,
    and for greedy or seeded sampling with the very tokens the first D would have produced.
  Each retry before the first token and each migration is counted (on_retry, on_migration).
Leaving the generator early (stop string, client gone, Abort) cancels the open calls and sends
Abort to every worker that holds the request, so no KV is stranded. A handle aborted before the
request opens a call (or between two calls) opens nothing more and ends as "abort".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from baton.cluster_tls import ClusterTLS
from baton.cluster_token import aio_token_channel
from baton.v1 import worker_pb2, worker_pb2_grpc
from baton.wire import finish_from_proto, logprob_from_proto, sampling_to_proto
from engine.request import FinishReason, TokenLogprob
from router.config import RouterConfig
from router.errors import ErrorKind, RouterError, from_worker_status
from router.prefix_index import PrefixAnswer
from router.registry import WorkerInfo
from router.requests import GenerationRequest
from router.routing import NoWorkerError, RoutePlan, choose_prefill, plan_route

# The global prefix index's answer for a prompt and some worker ids, or None when the index cannot
# answer (router/kv_events.py RedisPrefixIndexFeed.lookup).
PrefixLookup = Callable[[Sequence[int], list[str]], "PrefixAnswer | None"]

log = logging.getLogger(__name__)

# P failures after which another P, or else the same D, prefills instead.
_PREFILL_FALLBACK_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNIMPLEMENTED,
})


MAX_PREFILL_ATTEMPTS = 2  # prefill workers tried for one request before D prefills it itself


@dataclass
class TokenEvent:
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token when the request asked


@dataclass
class RequestHandle:
    """The live state of one request, shared with whoever may abort it."""

    request_id: str
    decode_worker: str | None = None
    prefill_worker: str | None = None
    prefill_pending: bool = False  # a Prefill RPC is in flight (P may hold KV for it)
    # The id the workers know the current attempt by: the request id, then "<id>~1", "<id>~2"
    # for later attempts, so a late Abort or cancellation of an old attempt never hits a new one.
    worker_request_id: str = ""
    num_attempts: int = 0
    num_cached_tokens: int = 0
    aborted: bool = False
    calls: set = field(default_factory=set)  # open grpc.aio calls

    def abort(self) -> None:
        self.aborted = True
        for call in list(self.calls):
            call.cancel()


class _PrefillFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class _DecodeUnavailable(Exception):
    pass


class ChannelPool:
    """One grpc.aio channel per worker address, created on first use (on the router's loop)."""

    def __init__(self, cluster_token: str | None = None, tls: ClusterTLS | None = None) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cluster_token = cluster_token  # carried by every call (baton/cluster_token.py)
        self._tls = tls  # mutual TLS (baton/cluster_tls.py)

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = aio_token_channel(address, self._cluster_token, self._tls)
            self._channels[address] = channel
        return channel

    async def retain(self, addresses: set[str]) -> None:
        """Close channels to workers that left the directory."""
        for address in [a for a in self._channels if a not in addresses]:
            await self._channels.pop(address).close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()


class Dispatcher:
    def __init__(self, config: RouterConfig, workers: Callable[[], list[WorkerInfo]],
                 max_attempts: int = 3, on_retry: Callable[[], None] = lambda: None,
                 on_migration: Callable[[], None] = lambda: None,
                 prefix_lookup: PrefixLookup | None = None,
                 on_route: Callable[[RoutePlan], None] = lambda plan: None) -> None:
        """prefix_lookup: the global prefix index (None, or answering None: load-only routing);
        on_route: called with every plan made (metrics)."""
        self.config = config
        self._workers = workers
        self._on_retry, self._on_migration = on_retry, on_migration
        self._prefix_lookup, self._on_route = prefix_lookup, on_route
        self._num_routed = 0  # plans made: round_robin's turn
        self.channels = ChannelPool(config.cluster_token, config.cluster_tls)
        self.inflight: dict[str, int] = {}  # worker_id -> this router's open requests on it
        self._max_attempts = max_attempts
        self._background: set[asyncio.Task] = set()

    # -- the request flow -----------------------------------------------------------------------

    async def run(self, req: GenerationRequest, handle: RequestHandle) -> AsyncIterator[TokenEvent]:
        """Token events of one request, ending with one that carries the finish reason.

        Raises RouterError. Closing the generator early aborts the request on its workers.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_s
        rid = req.request_id
        if handle.aborted:  # before it started (a choice waiting for choice 0): no worker has it
            yield TokenEvent([], FinishReason.ABORT)
            return
        excluded: set[str] = set()
        last_error: RouterError | None = None
        generated: list[int] = []  # the tokens the client has: a migration resumes after them
        for attempt in range(1, self._max_attempts + 1):
            try:
                plan = self._plan(req, frozenset(excluded), allow_remote=not generated)
            except RouterError:
                if last_error is not None:  # no other decode worker to try
                    raise last_error from None
                raise
            handle.decode_worker = plan.decode.worker_id
            handle.prefill_worker = plan.prefill.worker_id if plan.prefill else None
            log.info("request_id=%s: attempt %d: decode=%s prefill=%s (%d prompt tokens%s)", rid,
                     attempt, plan.decode.worker_id,
                     plan.prefill.worker_id if plan.prefill else "local", req.num_prompt_tokens,
                     f", resuming after {len(generated)} generated" if generated else "")
            self._acquire(plan.decode)  # a prefill worker counts only while it prefills
            try:
                async with contextlib.aclosing(
                        self._attempt(req, handle, plan, deadline, tuple(generated))) as events:
                    async for event in events:
                        generated += event.token_ids
                        yield event
                        if event.finish_reason is not None:
                            return
                raise RouterError(ErrorKind.UNAVAILABLE,
                                  "the decode worker ended the stream without a finish reason")
            except _DecodeUnavailable as exc:
                last_error = RouterError(
                    ErrorKind.UNAVAILABLE,
                    f"decode worker {plan.decode.worker_id} is unavailable: {exc}")
                if attempt == self._max_attempts:
                    raise last_error from None
                if generated:
                    log.warning("request_id=%s: decode worker %s failed after %d tokens (%s); "
                                "migrating the request", rid, plan.decode.worker_id,
                                len(generated), exc)
                    self._on_migration()
                else:
                    log.warning("request_id=%s: decode worker %s unavailable (%s), trying "
                                "another", rid, plan.decode.worker_id, exc)
                    self._on_retry()
                excluded.add(plan.decode.worker_id)
            finally:
                self._release(plan.decode)

    async def _attempt(self, req: GenerationRequest, handle: RequestHandle, plan: RoutePlan,
                       deadline: float, generated: tuple[int, ...]) -> AsyncIterator[TokenEvent]:
        """One decode worker's part of the request; generated: the tokens an earlier decode
        worker streamed (plan is then LOCAL), after which this one resumes."""
        rid = req.request_id
        decode = worker_pb2_grpc.DecodeStub(self.channels.get(plan.decode.grpc_address))
        d_call = None
        finished = False
        prefill = plan.prefill  # the prefill worker of the REMOTE attempt under way, if any
        failed_prefills: list[WorkerInfo] = []
        try:
            while prefill is not None:
                transfer_id = uuid.uuid4().hex
                d_call = self._open_decode(decode, req, handle, deadline,
                                           worker_pb2.PREFILL_MODE_REMOTE, transfer_id)
                current = prefill
                self._acquire(current)  # counted in flight while it prefills
                try:
                    first, first_logprob, first_reason = await self._remote_prefill(
                        req, handle, plan.decode, current, d_call, transfer_id, deadline)
                except _PrefillFailed as exc:
                    self._on_retry()
                    self._forget(handle, d_call)
                    d_call = None
                    self.abort_on(plan.decode, handle.worker_request_id)
                    self.abort_on(current, handle.worker_request_id)
                    failed_prefills.append(current)
                    prefill = None
                    if len(failed_prefills) < MAX_PREFILL_ATTEMPTS:
                        prefill = self._another_prefill(req, failed_prefills)
                    log.warning("request_id=%s: prefill on %s failed (%s); prefilling %s", rid,
                                current.worker_id, exc,
                                f"on {prefill.worker_id} instead" if prefill is not None
                                else f"locally on {plan.decode.worker_id}")
                    continue
                finally:
                    self._release(current)
                # finished: D's commit ends the request there too; leaving closes its stream
                finished = first_reason is not None
                yield TokenEvent([first], first_reason,
                                 None if first_logprob is None else [first_logprob])
                if finished:
                    return
                break
            first_local = d_call is None and not generated  # it reports the prompt's cache hits
            if d_call is None:
                d_call = self._open_decode(decode, req, handle, deadline,
                                           worker_pb2.PREFILL_MODE_LOCAL, "", generated)
            while True:
                msg = await self._read(d_call, handle, plan.decode)
                if msg is None:
                    return
                if not msg.HasField("tokens"):
                    log.warning("request_id=%s: unexpected %s message from decode worker %s",
                                rid, msg.WhichOneof("event"), plan.decode.worker_id)
                    continue
                if first_local:  # a local prefill reports its cache hits with its first batch
                    handle.num_cached_tokens = msg.tokens.num_cached_tokens
                    first_local = False
                reason = finish_from_proto(msg.tokens.finish_reason)
                if reason is not None:
                    finished = True
                logprobs = [logprob_from_proto(lp) for lp in msg.tokens.logprobs] or None
                yield TokenEvent(list(msg.tokens.token_ids), reason, logprobs)
                if finished:
                    return
        except asyncio.CancelledError:
            if handle.aborted and not _task_cancelling():
                log.info("request_id=%s: aborted", rid)
                finished = True  # the aborts below free the KV; finally need not repeat them
                if handle.worker_request_id:
                    self.abort_on(plan.decode, handle.worker_request_id)
                if handle.prefill_pending and prefill is not None:
                    self.abort_on(prefill, handle.worker_request_id)
                yield TokenEvent([], FinishReason.ABORT)
                return
            raise
        finally:
            if d_call is not None:
                self._forget(handle, d_call)
            if not finished and handle.worker_request_id:  # stop string, client gone, error
                self.abort_on(plan.decode, handle.worker_request_id)
                if handle.prefill_pending and prefill is not None:
                    self.abort_on(prefill, handle.worker_request_id)

    def _open_decode(self, stub, req: GenerationRequest, handle: RequestHandle, deadline: float,
                     mode: int, transfer_id: str, generated: tuple[int, ...] = ()):
        if handle.aborted:  # while an earlier call or attempt was ending: open nothing new
            raise asyncio.CancelledError()
        n = handle.num_attempts
        handle.num_attempts += 1
        handle.worker_request_id = req.request_id if n == 0 else f"{req.request_id}~{n}"
        request = worker_pb2.DecodeRequest(
            request_id=handle.worker_request_id, prompt_token_ids=req.prompt_token_ids,
            sampling=sampling_to_proto(req.sampling), prefill_mode=mode, transfer_id=transfer_id,
            output_token_ids=generated)
        call = stub.Generate(request, timeout=_remaining(deadline))
        handle.calls.add(call)
        return call

    async def _remote_prefill(self, req: GenerationRequest, handle: RequestHandle,
                              decode: WorkerInfo, prefill: WorkerInfo, d_call, transfer_id: str,
                              deadline: float
                              ) -> tuple[int, TokenLogprob | None, FinishReason | None]:
        """Reserve on D, then prefill on P: (first token, its logprob, the finish reason when
        that token already ends the request: max_tokens 1, EOS, a stop token id)."""
        rid = req.request_id
        try:
            msg = await asyncio.wait_for(self._read(d_call, handle, decode),
                                         timeout=min(self.config.reserve_timeout_s,
                                                     _remaining(deadline)))
        except asyncio.TimeoutError:
            raise RouterError(ErrorKind.TIMEOUT, f"decode worker {decode.worker_id} did "
                              f"not reserve KV within {self.config.reserve_timeout_s} s") from None
        if msg is None or not msg.HasField("reserved"):
            raise RouterError(ErrorKind.INTERNAL, f"decode worker {decode.worker_id} did not "
                              "answer a remote-prefill request with Reserved")
        num_cached = msg.reserved.num_cached_tokens
        handle.num_cached_tokens = num_cached
        log.debug("request_id=%s: %s reserved KV (%d cached tokens)", rid, decode.worker_id,
                  num_cached)
        if handle.aborted:  # while Reserved was on its way: D's call is cancelled, P gets nothing
            raise asyncio.CancelledError()
        stub = worker_pb2_grpc.PrefillStub(self.channels.get(prefill.grpc_address))
        call = stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id=handle.worker_request_id, prompt_token_ids=req.prompt_token_ids,
                sampling=sampling_to_proto(req.sampling), transfer_id=transfer_id,
                decode_address=decode.grpc_address, num_skip_tokens=num_cached, attempt=0),
            timeout=min(self.config.prefill_timeout_s, _remaining(deadline)))
        handle.calls.add(call)
        handle.prefill_pending = True
        try:
            reply = await call
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.CANCELLED and handle.aborted:
                raise asyncio.CancelledError() from None  # prefill_pending: P gets an Abort
            handle.prefill_pending = False  # P failed or refused: it holds nothing
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise from_worker_status(code.name, exc.details() or "", "prefill") from None
            raise _PrefillFailed(code, exc.details() or "") from None
        finally:
            self._forget(handle, call)
        handle.prefill_pending = False  # P answered: it pushed the KV and released its copy
        logprob = (logprob_from_proto(reply.first_token_logprob)
                   if reply.HasField("first_token_logprob") else None)
        return reply.first_token_id, logprob, finish_from_proto(reply.finish_reason)

    async def _read(self, call, handle: RequestHandle, worker: WorkerInfo):
        """The next message of a decode stream, None at its end; errors as RouterError."""
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise _DecodeUnavailable(exc.details() or "") from None
            if code == grpc.StatusCode.CANCELLED and handle.aborted:
                raise asyncio.CancelledError() from None
            raise from_worker_status(code.name, exc.details() or "", "decode") from None
        if msg is grpc.aio.EOF:
            return None
        return msg

    # -- bookkeeping ----------------------------------------------------------------------------

    def _lookup(self, req: GenerationRequest, workers: list[WorkerInfo]) -> PrefixAnswer:
        """What the index says the workers hold of req's prompt; nothing when routing is
        load-only (no index, the index is down, or a prefix-blind policy)."""
        answer = None
        if self._prefix_lookup is not None and self.config.routing.policy != "round_robin":
            answer = self._prefix_lookup(req.prompt_token_ids, [w.worker_id for w in workers])
        return answer if answer is not None else PrefixAnswer({}, {})

    def _plan(self, req: GenerationRequest, excluded: frozenset[str],
              allow_remote: bool = True) -> RoutePlan:
        workers = self._workers()
        known = self._lookup(req, workers)
        try:
            plan = plan_route(workers, self.inflight, num_prompt_tokens=req.num_prompt_tokens,
                              cached=known.cached_tokens, cache_blocks=known.num_blocks,
                              policy=self.config.routing, exclude=excluded,
                              allow_remote=allow_remote, turn=self._num_routed)
        except NoWorkerError as exc:
            raise RouterError(ErrorKind.UNAVAILABLE, str(exc), code="no_worker") from None
        self._num_routed += 1
        self._on_route(plan)
        return plan

    def _another_prefill(self, req: GenerationRequest,
                         tried: list[WorkerInfo]) -> WorkerInfo | None:
        """The cheapest ready prefill worker not yet tried, or None."""
        workers = self._workers()
        return choose_prefill(workers, req.num_prompt_tokens, self.inflight,
                              self._lookup(req, workers).cached_tokens, self.config.routing,
                              exclude=frozenset(w.worker_id for w in tried))

    def _acquire(self, *workers: WorkerInfo | None) -> None:
        for worker in workers:
            if worker is not None:
                self.inflight[worker.worker_id] = self.inflight.get(worker.worker_id, 0) + 1

    def _release(self, *workers: WorkerInfo | None) -> None:
        for worker in workers:
            if worker is not None:
                left = self.inflight.get(worker.worker_id, 0) - 1
                if left > 0:
                    self.inflight[worker.worker_id] = left
                else:
                    self.inflight.pop(worker.worker_id, None)

    @staticmethod
    def _forget(handle: RequestHandle, call) -> None:
        handle.calls.discard(call)
        call.cancel()  # no-op when the call already ended

    def abort_on(self, worker: WorkerInfo, request_id: str) -> None:
        """Tell `worker` to drop `request_id`, in the background (best effort, with a deadline)."""
        task = asyncio.get_running_loop().create_task(self._abort(worker, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, worker: WorkerInfo, request_id: str) -> None:
        channel = self.channels.get(worker.grpc_address)
        stub = (worker_pb2_grpc.PrefillStub(channel) if worker.role == "prefill"
                else worker_pb2_grpc.DecodeStub(channel))
        try:
            reply = await stub.Abort(worker_pb2.WorkerAbortRequest(request_id=request_id),
                                     timeout=self.config.worker_rpc_timeout_s)
            log.debug("request_id=%s: abort on %s (found=%s)", request_id, worker.worker_id,
                      reply.found)
        except grpc.aio.AioRpcError as exc:
            log.info("request_id=%s: abort on %s failed: %s %s", request_id, worker.worker_id,
                     exc.code().name, exc.details())

    async def close(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.config.worker_rpc_timeout_s)
        await self.channels.close()


def _remaining(deadline: float) -> float:
    return max(0.001, deadline - asyncio.get_running_loop().time())


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling and cancelling())
