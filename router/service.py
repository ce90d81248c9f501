"""The router's core service, shared by the HTTP and gRPC front ends.

`generate(req)` turns the worker token stream (router.lifecycle.Dispatcher) into client output:
incremental detokenization, stop strings (a match ends the request with "stop" and aborts it on
the workers), per-token logprobs with each token's offset in the choice's text, usage counts and
the router's metrics.

A request with n > 1 choices fans out into n worker requests "<id>#<i>" ("#" never appears in a
client's request id, see router.requests), choice i of a seeded request sampling with seed + i.
Choice 0 runs first; the others start once it produced its first token, when the workers have
its prompt's full blocks in their prefix caches, so they compute and store only the prompt's
tail. Their outputs are interleaved, each tagged with its choice index; the last output of the
whole request carries the usage: the prompt counted once (its cached tokens are choice 0's), the
completions summed. A choice that fails fails the request (the others are aborted on the workers).

Lifecycle of a request here: admitted (every choice's slot taken and handle registered at once,
or refused) -> running -> finished or failed or cancelled (handles unregistered, the request
counted once in the metrics). `abort(request_id)` cancels a live request, all its choices, from
anywhere (the gRPC Abort RPC); a choice aborted before it started ends as "abort" without
reaching a worker. Lives on the router's asyncio loop.
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
from router.lifecycle import Dispatcher, PrefixLookup, RequestHandle
from router.logprobs import TextOffsets
from router.registry import WorkerDirectory
from router.requests import GenerationRequest, RequestBuilder

log = logging.getLogger(__name__)

CHOICE_SEPARATOR = "#"  # choice i of request "r" is "r#i" on the workers


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
    # With logprobs: where each token's text starts in the choice's whole text (characters).
    text_offsets: tuple[int, ...] | None = None


@dataclass
class _Choice:
    """One choice of a request, as the workers see it, and what it produced so far."""

    req: GenerationRequest
    handle: RequestHandle
    num_generated: int = 0
    finish_reason: str | None = None


class GenerationService:
    def __init__(self, config: RouterConfig, tokenizer: Tokenizer, directory: WorkerDirectory,
                 metrics: RouterMetrics, max_model_len: int, vocab_size: int,
                 prefix_lookup: PrefixLookup | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.directory = directory
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.builder = RequestBuilder(tokenizer, model_name=config.model_name,
                                      max_model_len=max_model_len, vocab_size=vocab_size,
                                      max_stop_strings=config.max_stop_strings)
        self.dispatcher = Dispatcher(config, directory.workers,
                                     on_retry=metrics.request_retries.inc,
                                     on_migration=metrics.request_migrations.inc,
                                     prefix_lookup=prefix_lookup,
                                     on_route=lambda plan: metrics.routed(
                                         plan.mode.value, plan.reason, plan.cached_tokens))
        self._requests: dict[str, list[RequestHandle]] = {}  # request id -> one per choice
        self._num_active = 0

    @property
    def num_active(self) -> int:
        """Worker requests in flight: one per choice of every live request."""
        return self._num_active

    def _admit(self, req: GenerationRequest) -> list[_Choice]:
        """Take a slot per choice and register every choice's handle, or refuse the request
        before any work (a duplicate id, or too many in flight). Synchronous: an abort that
        follows finds every choice."""
        rid = req.request_id
        if rid in self._requests:
            raise RouterError.invalid(f"request_id {rid!r} is already in use", "request_id")
        if self._num_active + req.n > self.config.max_inflight_requests:
            raise RouterError(ErrorKind.OVERLOADED,
                              f"the router already has {self._num_active} requests in flight "
                              f"and this one needs {req.n}; retry later", code="too_many_requests")
        if req.n == 1:
            choices = [_Choice(req, RequestHandle(rid))]
        else:
            seed = req.sampling.seed
            choices = []
            for i in range(req.n):
                choice_id = f"{rid}{CHOICE_SEPARATOR}{i}"
                sampling = replace(req.sampling,
                                   seed=None if seed is None else (seed + i) % 2**63)
                choices.append(_Choice(replace(req, request_id=choice_id, n=1, sampling=sampling),
                                       RequestHandle(choice_id)))
        self._requests[rid] = [choice.handle for choice in choices]
        self._num_active += req.n
        return choices

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Output]:
        """Outputs of one request, every choice's ending with one that carries its finish_reason;
        the very last also carries the usage.

        Raises RouterError. Closing the generator early (client gone) aborts the request.
        """
        rid = req.request_id
        choices = self._admit(req)
        counted = False
        failed = False
        try:
            outputs = (self._run_choice(choices[0], 0) if req.n == 1
                       else self._fan_out(req, choices))
            async with contextlib.aclosing(outputs) as outputs:
                async for out in outputs:
                    if out.usage is not None:  # every choice finished
                        self._observe_finish(req, choices)
                        counted = True
                    yield out
        except RouterError as exc:
            failed = True
            log.info("request_id=%s: failed: %s (%s)", rid, exc.message, exc.kind.name)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if not counted:
                log.info("request_id=%s: cancelled by the client", rid)
            raise
        finally:
            del self._requests[rid]
            self._num_active -= req.n
            if not counted:
                self.metrics.generation_tokens.inc(sum(c.num_generated for c in choices))
                self.metrics.request_finished("error" if failed else "abort")

    async def _fan_out(self, req: GenerationRequest,
                       choices: list[_Choice]) -> AsyncIterator[Output]:
        queue: asyncio.Queue[Output | Exception] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async with contextlib.aclosing(self._run_choice(choices[index], index)) as outs:
                    async for out in outs:
                        queue.put_nowait(out)
            except Exception as exc:  # noqa: BLE001  (re-raised by the consumer below)
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(0))]
        try:
            num_left, num_completion = len(choices), 0
            while num_left:
                out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                if len(tasks) == 1:  # choice 0 has its first token (or ended): start the rest
                    tasks += [asyncio.create_task(pump(i)) for i in range(1, len(choices))]
                if out.usage is None:
                    yield out
                    continue
                num_left -= 1
                num_completion += out.usage.completion_tokens
                usage = Usage(req.num_prompt_tokens, num_completion,
                              choices[0].handle.num_cached_tokens)
                yield replace(out, usage=usage if num_left == 0 else None)
        finally:
            for task in tasks:
                task.cancel()  # closes the choices still running: they abort on the workers
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_choice(self, choice: _Choice, index: int) -> AsyncIterator[Output]:
        """One choice's outputs; its last carries the choice's own usage."""
        req, handle = choice.req, choice.handle
        rid = req.request_id
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stop = StopStringMatcher(req.stop)
        # With logprobs, each token's offset in the text (stop strings only ever cut its end).
        text_offsets = TextOffsets(self.tokenizer) if req.sampling.logprobs is not None else None
        last_token_at: float | None = None
        async with contextlib.aclosing(self.dispatcher.run(req, handle)) as events:
            async for event in events:
                now = time.monotonic()
                if event.token_ids:
                    self._observe_tokens(req, len(event.token_ids), now, last_token_at,
                                         first_of_request=index == 0)
                    last_token_at = now
                choice.num_generated += len(event.token_ids)
                offsets = None
                if text_offsets is not None:
                    offsets, pieces = [], []
                    for token_id in event.token_ids:
                        pieces.append(detokenizer.add([token_id]))
                        offsets.append(text_offsets.add(token_id, pieces[-1]))
                    text = "".join(pieces)
                else:
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
                offsets = tuple(offsets) if logprobs and offsets is not None else None
                if finish is None:
                    if text or event.token_ids:
                        yield Output(text, tuple(event.token_ids), index=index,
                                     logprobs=logprobs, text_offsets=offsets)
                    continue
                choice.finish_reason = finish.value
                usage = Usage(req.num_prompt_tokens, choice.num_generated,
                              handle.num_cached_tokens)
                log.info("request_id=%s: finished (%s): %d prompt (%d cached) + %d generated "
                         "tokens in %.3f s", rid, finish.value, usage.prompt_tokens,
                         usage.cached_tokens, usage.completion_tokens,
                         time.monotonic() - req.arrival_time)
                yield Output(text, tuple(event.token_ids), finish.value, usage, index, logprobs,
                             offsets)
                return
        raise RouterError(ErrorKind.INTERNAL, "the request ended without a finish reason")

    def abort(self, request_id: str) -> bool:
        handles = self._requests.get(request_id)
        if not handles:
            return False
        log.info("request_id=%s: abort requested", request_id)
        for handle in handles:
            handle.abort()
        return True

    def _observe_tokens(self, req: GenerationRequest, num_tokens: int, now: float,
                        last_token_at: float | None, first_of_request: bool) -> None:
        """Inter-token gaps of one choice's stream; the request's first token (choice 0's,
        which always comes first) for time to first token."""
        if last_token_at is None:
            if first_of_request:
                self.metrics.time_to_first_token.observe(now - req.arrival_time)
            num_tokens -= 1
            last_token_at = now
        if num_tokens > 0:
            gap = (now - last_token_at) / num_tokens
            for _ in range(num_tokens):
                self.metrics.inter_token_latency.observe(gap)

    def _observe_finish(self, req: GenerationRequest, choices: list[_Choice]) -> None:
        """Every choice finished: the request counts once (under choice 0's finish reason), its
        prompt once, the tokens of every choice."""
        self.metrics.e2e_request_latency.observe(time.monotonic() - req.arrival_time)
        self.metrics.prompt_tokens.inc(req.num_prompt_tokens)
        self.metrics.generation_tokens.inc(sum(c.num_generated for c in choices))
        self.metrics.request_finished(choices[0].finish_reason or "abort")

    async def close(self) -> None:
        for handles in list(self._requests.values()):
            for handle in handles:
                handle.abort()
        await self.dispatcher.close()
