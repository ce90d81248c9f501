"""The router's core service, shared by the HTTP and gRPC front ends.

`generate(req)` turns the worker token stream (router.lifecycle.Dispatcher) into client output:
incremental detokenization, stop strings (a match ends the request with "stop" and aborts it on
the workers), per-token logprobs, usage counts and the router's latency metrics. A request with
n > 1 choices fans out into n worker requests "<id>-<i>" (choice i of a seeded request samples
with seed + i) whose outputs are interleaved, each tagged with its choice index; the last output
of the whole request carries the usage: the prompt counted once, the completions summed.
`abort(request_id)` cancels a live request, all its choices, from anywhere (the gRPC Abort RPC).
Lives on the router's asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from baton.metrics import RouterMetrics
from engine.request import FinishReason, TokenLogprob
from engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from router.config import RouterConfig
from router.errors import ErrorKind, RouterError
from router.lifecycle import Dispatcher, RequestHandle
from router.registry import WorkerDirectory
from router.requests import GenerationRequest, RequestBuilder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Output:
    """A piece of one choice's output. A choice's last piece has finish_reason set; the last
    piece of the whole request (every choice finished) also has usage set."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    usage: Usage | None = None
    index: int = 0  # the choice
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when asked for


class GenerationService:
    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, directory: WorkerDirectory,
                 metrics: RouterMetrics, max_model_len: int, vocab_size: int) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.directory = directory
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.builder = RequestBuilder(tokenizer, model_name=config.model_name,
                                      max_model_len=max_model_len, vocab_size=vocab_size,
                                      max_stop_strings=config.max_stop_strings)
        self.dispatcher = Dispatcher(config, directory.workers)
        self._active: dict[str, RequestHandle] = {}
        self._groups: dict[str, list[str]] = {}  # request id of n > 1 choices -> theirs

    @property
    def num_active(self) -> int:
        return len(self._active)

    def admit(self, request_id: str, num_requests: int = 1) -> None:
        """Refuse a request before any work: a duplicate id, or too many in flight."""
        if request_id in self._active or request_id in self._groups:
            raise RouterError.invalid(f"request_id {request_id!r} is already in use", "request_id")
        if len(self._active) + num_requests > self.config.max_inflight_requests:
            raise RouterError(ErrorKind.OVERLOADED,
                              f"the router already has {len(self._active)} requests in flight; "
                              "retry later", code="too_many_requests")

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Output]:
        """Outputs of one request, every choice's ending with one that carries its finish_reason;
        the very last also carries the usage.

        Raises RouterError. Closing the generator early (client gone) aborts the request.
        """
        if req.n == 1:
            async with contextlib.aclosing(self._generate_choice(req, 0)) as outputs:
                async for out in outputs:
                    yield out
            return
        rid = req.request_id
        self.admit(rid, req.n)
        seed = req.sampling.seed
        choices = [replace(req, request_id=f"{rid}-{i}", n=1, sampling=replace(
            req.sampling, seed=None if seed is None else (seed + i) % 2**63))
            for i in range(req.n)]
        self._groups[rid] = [choice.request_id for choice in choices]
        queue: asyncio.Queue[Output | Exception] = asyncio.Queue()

        async def pump(index: int, choice: GenerationRequest) -> None:
            try:
                async with contextlib.aclosing(self._generate_choice(choice, index)) as outputs:
                    async for out in outputs:
                        queue.put_nowait(out)
            except Exception as exc:  # noqa: BLE001  (re-raised by the consumer below)
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(i, choice)) for i, choice in enumerate(choices)]
        try:
            num_left, num_completion, num_cached = req.n, 0, 0
            while num_left:
                out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                if out.usage is None:
                    yield out
                    continue
                num_left -= 1
                num_completion += out.usage.completion_tokens
                num_cached = max(num_cached, out.usage.cached_tokens)
                usage = Usage(req.num_prompt_tokens, num_completion, num_cached)
                yield replace(out, usage=usage if num_left == 0 else None)
        finally:
            for task in tasks:
                task.cancel()  # closes the choices still running: they abort on the workers
            await asyncio.gather(*tasks, return_exceptions=True)
            self._groups.pop(rid, None)

    async def _generate_choice(self, req: GenerationRequest, index: int) -> AsyncIterator[Output]:
        rid = req.request_id
        self.admit(rid)
        handle = RequestHandle(rid)
        self._active[rid] = handle
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stop = StopStringMatcher(req.stop)
        num_generated = 0
        last_token_at: float | None = None
        outcome = "abort"  # what requests_total counts if we leave without a finish reason
        counted = False
        try:
            async with contextlib.aclosing(self.dispatcher.run(req, handle)) as events:
                async for event in events:
                    now = time.monotonic()
                    if event.token_ids:
                        self._observe_tokens(req, len(event.token_ids), now, last_token_at)
                        last_token_at = now
                    num_generated += len(event.token_ids)
                    text = detokenizer.add(event.token_ids)
                    finish = event.finish_reason
                    if finish is not None:
                        text += detokenizer.flush()
                    match = stop.feed(text)
                    text = match.text
                    if match.stopped:
                        finish = FinishReason.STOP
                        log.info("request_id=%s: stop string %r matched", rid, match.stop)
                    elif finish is not None:
                        text += stop.flush()
                    logprobs = tuple(event.logprobs) if event.logprobs else None
                    if finish is None:
                        if text or event.token_ids:
                            yield Output(text, tuple(event.token_ids), index=index,
                                         logprobs=logprobs)
                        continue
                    outcome = finish.value
                    usage = Usage(req.num_prompt_tokens, num_generated, handle.num_cached_tokens)
                    self._observe_finish(req, usage, outcome)
                    counted = True
                    log.info("request_id=%s: finished (%s): %d prompt + %d generated tokens in "
                             "%.3f s", rid, outcome, usage.prompt_tokens,
                             usage.completion_tokens, time.monotonic() - req.arrival_time)
                    yield Output(text, tuple(event.token_ids), outcome, usage, index, logprobs)
                    return
            raise RouterError(ErrorKind.INTERNAL, "the request ended without a finish reason")
        except RouterError as exc:
            outcome = "error"
            log.info("request_id=%s: failed: %s (%s)", rid, exc.message, exc.kind.name)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not counted:
                log.info("request_id=%s: cancelled by the client", rid)
            raise
        finally:
            self._active.pop(rid, None)
            if not counted:
                self.metrics.request_finished(outcome)

    def abort(self, request_id: str) -> bool:
        handles = [self._active[rid] for rid in self._groups.get(request_id, [request_id])
                   if rid in self._active]
        if not handles:
            return False
        log.info("request_id=%s: abort requested", request_id)
        for handle in handles:
            handle.abort()
        return True

    def _observe_tokens(self, req: GenerationRequest, num_tokens: int, now: float,
                        last_token_at: float | None) -> None:
        if last_token_at is None:
            self.metrics.time_to_first_token.observe(now - req.arrival_time)
            num_tokens -= 1
            last_token_at = now
        if num_tokens > 0:
            gap = (now - last_token_at) / num_tokens
            for _ in range(num_tokens):
                self.metrics.inter_token_latency.observe(gap)

    def _observe_finish(self, req: GenerationRequest, usage: Usage, outcome: str) -> None:
        self.metrics.e2e_request_latency.observe(time.monotonic() - req.arrival_time)
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        self.metrics.generation_tokens.inc(usage.completion_tokens)
        self.metrics.request_finished(outcome)

    async def close(self) -> None:
        for handle in list(self._active.values()):
            handle.abort()
        await self.dispatcher.close()
