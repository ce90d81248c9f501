"""Baton's Python SDK: Client (blocking) and AsyncClient (asyncio) over the router's gRPC API
(baton.v1.Generation).

    from baton import Client
    with Client("127.0.0.1:50051") as client:
        result = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32)
        print(result.text, result.finish_reason, result.usage.completion_tokens)
        for chunk in client.stream("Once upon a time", max_tokens=64):
            print(chunk.text, end="", flush=True)

Inputs: a text `prompt` (no chat template), chat `messages` (the model's template is applied) or
`token_ids` — exactly one. Sampling and stopping (GenerateOptions): temperature, top_p, top_k,
min_p, seed, max_tokens, stop, stop_token_ids, ignore_eos, presence_penalty, frequency_penalty,
repetition_penalty; unset values take the server's defaults. `logprobs=k` returns each token's
log-probability and its k most likely alternatives (Chunk.logprobs); `n` asks for n choices of one
prompt (chunks carry their choice index; Result.choices holds them all, Result.text is choice
0's). `timeout` is the deadline of the whole call (retries included). A call that fails with
UNAVAILABLE before any token arrived is retried with backoff up to `max_retries` times; later
failures raise. Failures raise BatonError subclasses named after their cause. A router that wants
an API key gets `api_key` (default: the BATON_API_KEY environment variable) with every call.
This module imports grpc and the generated stubs only (no torch, no engine), which is why
TokenLogprob and its conversion here mirror engine.request.TokenLogprob and baton.wire's.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import grpc
import grpc.aio

from baton.v1 import common_pb2, generation_pb2, generation_pb2_grpc

if TYPE_CHECKING:
    from typing import Self, Unpack

_FINISH = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, with the most likely tokens (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """New output of one choice of a streamed request. A choice's last chunk has finish_reason
    set; the request's last chunk also has usage (all choices)."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    usage: Usage | None = None
    index: int = 0  # the choice
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id when logprobs was asked for


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Result:
    """A finished request; text, token_ids, finish_reason and logprobs are choice 0's."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    logprobs: tuple[TokenLogprob, ...] = ()
    choices: tuple[Choice, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    id: str
    max_model_len: int


class BatonError(Exception):
    """A failed call. `code` is the gRPC status name (e.g. "INVALID_ARGUMENT")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadRequestError(BatonError):
    """The request can never succeed as sent (the message names the parameter)."""


class AuthenticationError(BatonError):
    """The router wants an API key (api_key=, or BATON_API_KEY) and got none, or a wrong one."""


class OverloadedError(BatonError):
    """The cluster has no capacity right now; retry later."""


class UnavailableError(BatonError):
    """The router or every worker is unreachable."""


class DeadlineExceededError(BatonError):
    """The call did not finish within its timeout."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _error(exc: grpc.RpcError) -> BatonError:
    code = exc.code()
    return _ERRORS.get(code, BatonError)(code.name, exc.details() or "")


Message = Mapping[str, str] | tuple[str, str]


class GenerateOptions(TypedDict, total=False):
    """Sampling and stopping options of stream() and generate(); unset ones take the server's
    defaults. Each is the baton.v1.GenerateRequest field of the same name."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    max_tokens: int
    stop: str | Sequence[str]
    stop_token_ids: Sequence[int]
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logprobs: int
    n: int


def _request(prompt: str | None, messages: Sequence[Message] | None,
             token_ids: Sequence[int] | None, *, model: str | None, request_id: str | None,
             **options: Unpack[GenerateOptions]) -> generation_pb2.GenerateRequest:
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise TypeError("pass exactly one of prompt, messages or token_ids")
    unknown = sorted(set(options) - GenerateOptions.__annotations__.keys())
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    req = generation_pb2.GenerateRequest(request_id=request_id or f"sdk-{uuid.uuid4().hex}",
                                         model=model or "")
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        for message in messages:
            role, content = ((message["role"], message["content"]) if isinstance(message, Mapping)
                             else message)
            req.chat.messages.add(role=role, content=content)
        if not messages:
            req.chat.SetInParent()  # an empty conversation: the server names the problem
    else:
        req.token_ids.ids.extend(token_ids)
        if not token_ids:
            req.token_ids.SetInParent()
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(getattr(req, name), (bool, int, float, str)):  # a scalar field
            setattr(req, name, value)
        else:  # repeated: stop takes one string or several
            getattr(req, name).extend([value] if isinstance(value, str) else value)
    return req


def _logprob(msg: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))


def _chunk(msg: generation_pb2.GenerateResponse) -> Chunk:
    usage = None
    if msg.HasField("usage"):
        usage = Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens,
                      msg.usage.cached_tokens)
    logprobs = tuple(_logprob(lp) for lp in msg.logprobs)
    return Chunk(msg.request_id, msg.text, tuple(msg.token_ids), _FINISH[msg.finish_reason], usage,
                 msg.index, logprobs)


def _result(chunks: list[Chunk]) -> Result:
    last = chunks[-1] if chunks else None
    if last is None or last.finish_reason is None or last.usage is None:
        raise BatonError("INTERNAL", "the stream ended without a finish reason")
    by_index: dict[int, list[Chunk]] = {}
    for chunk in chunks:
        by_index.setdefault(chunk.index, []).append(chunk)
    choices = []
    for index in sorted(by_index):
        own = by_index[index]
        finish = next((c.finish_reason for c in reversed(own) if c.finish_reason), None)
        if finish is None:
            raise BatonError("INTERNAL", f"choice {index} ended without a finish reason")
        choices.append(Choice(index, "".join(c.text for c in own),
                              tuple(t for c in own for t in c.token_ids), finish,
                              tuple(lp for c in own for lp in c.logprobs)))
    first = choices[0]
    return Result(request_id=last.request_id, text=first.text, token_ids=first.token_ids,
                  finish_reason=first.finish_reason, usage=last.usage, logprobs=first.logprobs,
                  choices=tuple(choices))


class _Base:
    def __init__(self, address: str, *, model: str | None, timeout: float, max_retries: int,
                 retry_backoff_s: float, api_key: str | None) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.address = address
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        api_key = api_key if api_key is not None else os.environ.get("BATON_API_KEY")
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _backoff(self, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before retry `attempt` (1-based), or None when out of retries/time."""
        if attempt > self.max_retries:
            return None
        delay = self.retry_backoff_s * (2 ** (attempt - 1))
        return delay if time.monotonic() + delay < deadline else None


class Client(_Base):
    """Blocking client. Thread-safe; one channel per client. Use as a context manager."""

    def __init__(self, address: str = "127.0.0.1:50051", *, model: str | None = None,
                 timeout: float = 300.0, max_retries: int = 3, retry_backoff_s: float = 0.2,
                 api_key: str | None = None) -> None:
        super().__init__(address, model=model, timeout=timeout, max_retries=max_retries,
                         retry_backoff_s=retry_backoff_s, api_key=api_key)
        self._channel = grpc.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def stream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
               token_ids: Sequence[int] | None = None, request_id: str | None = None,
               timeout: float | None = None, **options: Unpack[GenerateOptions],
               ) -> Iterator[Chunk]:
        """Chunks of one request as they arrive; options: see GenerateOptions."""
        req = _request(prompt, messages, token_ids, model=self.model, request_id=request_id,
                       **options)
        deadline = time.monotonic() + (timeout or self.timeout)
        attempt = 0
        while True:
            call = self._stub.Generate(req, timeout=max(0.001, deadline - time.monotonic()),
                                       wait_for_ready=attempt > 0, metadata=self._metadata)
            received = False
            try:
                for msg in call:
                    received = True
                    yield _chunk(msg)
                return
            except grpc.RpcError as exc:
                attempt += 1
                delay = (self._backoff(attempt, deadline)
                         if exc.code() == grpc.StatusCode.UNAVAILABLE and not received else None)
                if delay is None:
                    raise _error(exc) from None
                time.sleep(delay)
            finally:
                call.cancel()  # the caller stopped early: the router aborts the request

    def generate(self, prompt: str | None = None, **kwargs) -> Result:
        """Run one request to its end. Same arguments as stream()."""
        return _result(list(self.stream(prompt, **kwargs)))

    def abort(self, request_id: str, timeout: float = 10.0) -> bool:
        try:
            reply = self._stub.Abort(generation_pb2.AbortRequest(request_id=request_id),
                                     timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return reply.found

    def list_models(self, timeout: float = 10.0) -> list[ModelInfo]:
        try:
            reply = self._stub.ListModels(generation_pb2.ListModelsRequest(), timeout=timeout,
                                          metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return [ModelInfo(m.id, m.max_model_len) for m in reply.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client. Create and use it inside one event loop; `await client.close()`."""

    def __init__(self, address: str = "127.0.0.1:50051", *, model: str | None = None,
                 timeout: float = 300.0, max_retries: int = 3, retry_backoff_s: float = 0.2,
                 api_key: str | None = None) -> None:
        super().__init__(address, model=model, timeout=timeout, max_retries=max_retries,
                         retry_backoff_s=retry_backoff_s, api_key=api_key)
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def stream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                     token_ids: Sequence[int] | None = None, request_id: str | None = None,
                     timeout: float | None = None, **options: Unpack[GenerateOptions],
                     ) -> AsyncIterator[Chunk]:
        """Chunks of one request as they arrive; options: see GenerateOptions."""
        req = _request(prompt, messages, token_ids, model=self.model, request_id=request_id,
                       **options)
        deadline = time.monotonic() + (timeout or self.timeout)
        attempt = 0
        while True:
            call = self._stub.Generate(req, timeout=max(0.001, deadline - time.monotonic()),
                                       wait_for_ready=attempt > 0, metadata=self._metadata)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield _chunk(msg)
                return
            except grpc.aio.AioRpcError as exc:
                attempt += 1
                delay = (self._backoff(attempt, deadline)
                         if exc.code() == grpc.StatusCode.UNAVAILABLE and not received else None)
                if delay is None:
                    raise _error(exc) from None
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    async def generate(self, prompt: str | None = None, **kwargs) -> Result:
        chunks = [chunk async for chunk in self.stream(prompt, **kwargs)]
        return _result(chunks)

    async def abort(self, request_id: str, timeout: float = 10.0) -> bool:
        try:
            reply = await self._stub.Abort(generation_pb2.AbortRequest(request_id=request_id),
                                           timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return reply.found

    async def list_models(self, timeout: float = 10.0) -> list[ModelInfo]:
        try:
            reply = await self._stub.ListModels(generation_pb2.ListModelsRequest(),
                                                timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return [ModelInfo(m.id, m.max_model_len) for m in reply.models]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
