"""The router's HTTP API (FastAPI): OpenAI-compatible completions and chat completions, plus the
operational endpoints (/health, /metrics, /cluster, /prometheus/targets).

Every error answers in OpenAI's shape {"error": {"message", "type", "param", "code"}}; request
validation failures (including FastAPI's own, normally 422) answer 400 and name the parameter.
A streamed request waits for its first output before sending headers, so failures before the
first token still get a proper status code; later failures arrive as an SSE `error` event. A
client that disconnects has its request aborted on the workers. With n > 1, streamed chunks carry
one choice each (its index); the usage chunk, when asked for, comes once every choice finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.request import TokenLogprob
from router.auth import ApiKeys
from router.errors import ErrorKind, RouterError
from router.logprobs import TokenTexts, completion_logprobs
from router.openai_schema import ChatCompletionRequest, CompletionRequest, check_unsupported
from router.registry import WorkerDirectory
from router.requests import SAMPLING_ARGS, GenerationRequest
from router.service import GenerationService, Output, Usage

log = logging.getLogger(__name__)

T = TypeVar("T")
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the completions API (chat: top_logprobs <= 20)


def error_response(exc: RouterError) -> JSONResponse:
    retry = exc.retry_after_s
    return JSONResponse(exc.to_openai(), status_code=exc.kind.http_status,
                        headers=None if retry is None else {"Retry-After": str(retry)})


class _Gate:
    """Before a body is read: the API key on /v1/* and /cluster, then, for generation, a full
    router refuses at once (service.generate checks again, counting the request's n choices).
    Plain ASGI, so a client's disconnect still reaches the endpoints (Starlette's
    BaseHTTPMiddleware hides it)."""

    def __init__(self, app, *, keys: ApiKeys, service: GenerationService) -> None:
        self.app, self.keys, self.service = app, keys, service

    async def __call__(self, scope, receive, send) -> None:
        refusal = self._refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def _refusal(self, scope) -> JSONResponse | None:
        path = scope["path"]
        if not (path.startswith("/v1/") or path == "/cluster"):
            return None
        headers = dict(scope["headers"])
        why = self.keys.check((headers.get(b"authorization") or b"").decode("latin-1"))
        if why is not None:
            body = RouterError(ErrorKind.UNAUTHENTICATED, why, code="invalid_api_key").to_openai()
            return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        service = self.service
        if (scope["method"] == "POST" and path in GENERATION_PATHS
                and service.num_active >= service.config.max_inflight_requests):
            return error_response(RouterError(
                ErrorKind.OVERLOADED, f"the router already has {service.num_active} requests in "
                "flight; retry later", code="too_many_requests"))
        return None


def _validation_error(exc: RequestValidationError) -> RouterError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error") or first.get("msg")
        return RouterError.invalid(f"the request body is not valid JSON: {reason}")
    if not loc:
        return RouterError.invalid("the request body must be a JSON object")
    param = loc[0]
    where = ".".join(loc)
    return RouterError.invalid(f"{where}: {first.get('msg')}", param)


def create_app(service: GenerationService, directory: WorkerDirectory,
               router_targets: Callable[[], list[str]]) -> FastAPI:
    """router_targets() gives the router's own host:port for /prometheus/targets."""
    app = FastAPI(title="Baton router", docs_url=None, redoc_url=None, openapi_url=None)
    config = service.config
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(RouterError)
    async def _on_router_error(request: Request, exc: RouterError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = ErrorKind.NOT_FOUND if exc.status_code == 404 else ErrorKind.INVALID_REQUEST
        body = RouterError(kind, str(exc.detail)).to_openai()
        return JSONResponse(body, status_code=exc.status_code)

    app.add_middleware(_Gate, keys=ApiKeys(config.api_keys), service=service)

    texts = TokenTexts(service.tokenizer)

    def sampling_args(body: CompletionRequest | ChatCompletionRequest) -> dict:
        return {name: getattr(body, name) for name in SAMPLING_ARGS}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_unsupported(body)
        service.builder.check_model(body.model)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if isinstance(body.prompt, list) and len(body.prompt) == 1 and isinstance(body.prompt[0], str):
            body.prompt = body.prompt[0]  # a batch of one prompt
        if body.prompt is None:
            raise RouterError.invalid("prompt is required", "prompt")
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], (str, list)):
            raise RouterError.invalid("only one prompt per request is supported", "prompt")
        if isinstance(body.prompt, list):
            prompt_ids = service.builder.prompt_ids_from_ids(body.prompt)
        else:
            prompt_ids = service.builder.prompt_ids_from_text(body.prompt)
        req = service.builder.build(
            rid, prompt_ids, max_tokens=body.max_tokens, default_max_tokens=16,
            logprobs=body.logprobs, max_logprobs=MAX_COMPLETION_LOGPROBS, **sampling_args(body))
        envelope = {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": config.model_name}

        def choice(index: int, text: str, logprobs: Sequence[TokenLogprob],
                   text_offsets: Sequence[int], finish_reason: str | None) -> dict:
            block = (completion_logprobs(texts, logprobs, text_offsets)
                     if body.logprobs is not None else None)
            return {"index": index, "text": text, "logprobs": block,
                    "finish_reason": finish_reason}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(
                request, service, req, envelope, include_usage,
                lambda out: [choice(out.index, out.text, out.logprobs or (),
                                    out.text_offsets or (), out.finish_reason)], prelude=[])
        collected, usage = await _collect(request, service, req)
        return JSONResponse({**envelope, "usage": _usage(usage), "choices": [
            choice(i, "".join(c.pieces), c.logprobs, c.text_offsets, c.finish_reason)
            for i, c in enumerate(collected)]})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_unsupported(body)
        service.builder.check_model(body.model)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.messages is None:
            raise RouterError.invalid("messages is required", "messages")
        prompt_ids = service.builder.prompt_ids_from_messages(body.messages)
        use_new = body.max_completion_tokens is not None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        req = service.builder.build(
            rid, prompt_ids, max_tokens=body.max_completion_tokens if use_new else body.max_tokens,
            default_max_tokens=None, max_tokens_param="max_completion_tokens" if use_new
            else "max_tokens", prompt_param="messages", logprobs=logprobs,
            logprobs_param="top_logprobs", **sampling_args(body))
        envelope = {"id": rid, "object": "chat.completion", "created": int(time.time()),
                    "model": config.model_name}

        def chat_logprobs(logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob] | None):
            return texts.chat_logprobs(logprobs or ()) if body.logprobs else None

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunk_envelope = {**envelope, "object": "chat.completion.chunk"}

            def choices(out: Output) -> list[dict]:
                delta = {"content": out.text} if out.text else {}
                return [{"index": out.index, "delta": delta,
                         "logprobs": chat_logprobs(out.logprobs),
                         "finish_reason": out.finish_reason}]

            prelude = [[{"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}] for i in range(req.n)]
            return await _stream(request, service, req, chunk_envelope, include_usage, choices,
                                 prelude=prelude)
        collected, usage = await _collect(request, service, req)
        return JSONResponse({**envelope, "usage": _usage(usage), "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(c.pieces)},
             "logprobs": chat_logprobs(c.logprobs), "finish_reason": c.finish_reason}
            for i, c in enumerate(collected)]})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": created, "owned_by": "baton",
            "max_model_len": service.max_model_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = directory.workers()
        num_decode = sum(1 for w in workers if w.role == "decode" and w.state == "ready")
        num_prefill = sum(1 for w in workers if w.role == "prefill" and w.state == "ready")
        ok = num_decode > 0
        return JSONResponse({"status": "ok" if ok else "no_ready_decode_worker",
                             "ready_decode_workers": num_decode,
                             "ready_prefill_workers": num_prefill,
                             "mode": "disaggregated" if num_prefill else "colocated"},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/cluster")
    async def cluster() -> dict:
        inflight = service.dispatcher.inflight
        return {
            "model": config.model_name,
            "max_model_len": service.max_model_len,
            "router": {"targets": router_targets(), "num_active_requests": service.num_active},
            "workers": [{
                "id": w.worker_id, "role": w.role, "state": w.state,
                "grpc_address": w.grpc_address, "metrics_url": w.metrics_url, "pid": w.pid,
                "node": w.node, "running": w.num_running, "waiting": w.num_waiting,
                "kv_usage": w.kv_usage, "router_inflight": inflight.get(w.worker_id, 0),
                "started_at": w.started_at, "updated_at": w.updated_at,
            } for w in directory.workers()],
        }

    @app.get("/prometheus/targets")
    async def prometheus_targets() -> list[dict]:
        groups = [{"targets": router_targets(),
                   "labels": {"job": "baton", "role": "router", "model": config.model_name,
                              "__metrics_path__": "/metrics"}}]
        for w in directory.workers():
            url = urlsplit(w.metrics_url)
            if not url.netloc:
                continue
            groups.append({"targets": [url.netloc], "labels": {
                "job": "baton", "role": w.role, "worker": w.worker_id,
                "model": config.model_name, "__metrics_path__": url.path or "/metrics",
                "__scheme__": url.scheme or "http"}})
        return groups

    return app


def _usage(usage: Usage) -> dict:
    result = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
              "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        result["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return result


async def _until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the HTTP client goes away meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise asyncio.CancelledError("the client disconnected")
    finally:
        if not task.done():
            task.cancel()


@dataclass
class _Collected:
    """One choice of a non-streamed request, gathered."""

    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    text_offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None


async def _collect(request: Request, service: GenerationService,
                   req: GenerationRequest) -> tuple[list[_Collected], Usage]:
    async def run() -> tuple[list[_Collected], Usage]:
        collected = [_Collected() for _ in range(req.n)]
        async with contextlib.aclosing(service.generate(req)) as outputs:
            async for out in outputs:
                choice = collected[out.index]
                choice.pieces.append(out.text)
                choice.logprobs.extend(out.logprobs or ())
                choice.text_offsets.extend(out.text_offsets or ())
                if out.finish_reason is not None:
                    choice.finish_reason = out.finish_reason
                if out.usage is not None:
                    return collected, out.usage
        raise RouterError(ErrorKind.INTERNAL, "the request ended without a finish reason")

    return await _until_disconnect(request, run())


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _stream(request: Request, service: GenerationService, req: GenerationRequest,
                  envelope: dict, include_usage: bool, choices: Callable[[Output], list[dict]],
                  prelude: list[list[dict]]) -> Response:
    outputs = service.generate(req)
    try:  # the first output before any header: early failures keep their status code
        first = await _until_disconnect(request, outputs.__anext__())
    except BaseException:
        await outputs.aclose()
        raise

    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        payload = {**envelope, "choices": choice_list}
        if include_usage:
            payload["usage"] = usage
        return _sse(payload)

    async def events() -> AsyncIterator[str]:
        async with contextlib.aclosing(outputs):
            for choice_list in prelude:
                yield chunk(choice_list)
            out = first
            while True:
                if out.text or out.logprobs or out.finish_reason is not None:
                    yield chunk(choices(out))
                if out.usage is not None:  # every choice finished
                    if include_usage:
                        yield chunk([], _usage(out.usage))
                    break
                try:
                    out = await outputs.__anext__()
                except RouterError as exc:
                    yield _sse(exc.to_openai())
                    break
                except StopAsyncIteration:
                    err = RouterError(ErrorKind.INTERNAL, "the request ended without a finish reason")
                    yield _sse(err.to_openai())
                    break
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": req.request_id})
