"""The router's public gRPC API: baton.v1.Generation on grpc.aio, with grpc.health.v1 and
server reflection. Bad input -> INVALID_ARGUMENT naming the parameter; no capacity ->
RESOURCE_EXHAUSTED; no worker -> UNAVAILABLE; a request over its deadline -> DEADLINE_EXCEEDED.
With n > 1 choices, each response message belongs to one choice (its index); the last message of
the whole request carries the usage.
A client that cancels its stream has its request aborted on the workers.
"""

from __future__ import annotations

import contextlib
import logging
import uuid

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from baton.wire import GRPC_OPTIONS, logprob_to_proto
from router.auth import ApiKeyInterceptor, ApiKeys
from router.errors import RouterError
from router.requests import SAMPLING_ARGS
from router.service import GenerationService, Output

log = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name

_FINISH = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
# GenerateRequest fields passed to RequestBuilder.build under the same name.
_BUILD_ARGS = (*SAMPLING_ARGS, "max_tokens", "logprobs")


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, service: GenerationService) -> None:
        self.service = service

    async def Generate(self, request: generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext):
        try:
            req = self._build(request)
        except RouterError as exc:
            await _abort(context, exc)
            return
        try:
            async with contextlib.aclosing(self.service.generate(req)) as outputs:
                async for out in outputs:
                    yield _response(req.request_id, out)
        except RouterError as exc:
            await _abort(context, exc)

    def _build(self, request: generation_pb2.GenerateRequest):
        builder = self.service.builder
        builder.check_model(request.model, required=False)
        rid = request.request_id or f"gen-{uuid.uuid4().hex}"
        which = request.WhichOneof("input")
        if which == "prompt":
            prompt_ids = builder.prompt_ids_from_text(request.prompt)
            prompt_param, default_max = "prompt", 16
        elif which == "chat":
            messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            prompt_ids = builder.prompt_ids_from_messages(messages)
            prompt_param, default_max = "chat", None
        elif which == "token_ids":
            prompt_ids = builder.prompt_ids_from_ids(list(request.token_ids.ids), "token_ids")
            prompt_param, default_max = "token_ids", 16
        else:
            raise RouterError.invalid("one of prompt, chat or token_ids must be set", "input")
        return builder.build(rid, prompt_ids, default_max_tokens=default_max,
                             prompt_param=prompt_param,
                             **{name: _field(request, name) for name in _BUILD_ARGS})

    async def Abort(self, request: generation_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> generation_pb2.AbortResponse:
        return generation_pb2.AbortResponse(found=self.service.abort(request.request_id))

    async def ListModels(self, request: generation_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> generation_pb2.ListModelsResponse:
        return generation_pb2.ListModelsResponse(models=[generation_pb2.ModelInfo(
            id=self.service.config.model_name, max_model_len=self.service.max_model_len)])


def _field(request: generation_pb2.GenerateRequest, name: str):
    """A field's value; None for an unset `optional` field or an empty repeated one."""
    value = getattr(request, name)
    if isinstance(value, (bool, int, float, str)):
        has_presence = request.DESCRIPTOR.fields_by_name[name].has_presence
        return value if not has_presence or request.HasField(name) else None
    return list(value) or None


def _response(request_id: str, out: Output) -> generation_pb2.GenerateResponse:
    msg = generation_pb2.GenerateResponse(
        request_id=request_id, token_ids=out.token_ids, text=out.text,
        finish_reason=_FINISH[out.finish_reason], index=out.index,
        logprobs=[logprob_to_proto(lp) for lp in out.logprobs or ()])
    if out.usage is not None:
        msg.usage.CopyFrom(generation_pb2.Usage(prompt_tokens=out.usage.prompt_tokens,
                                                completion_tokens=out.usage.completion_tokens,
                                                cached_tokens=out.usage.cached_tokens))
    return msg


async def _abort(context: grpc.aio.ServicerContext, exc: RouterError) -> None:
    if exc.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
    await context.abort(getattr(grpc.StatusCode, exc.kind.grpc_code_name), exc.grpc_details())


def create_server(service: GenerationService, host: str, port: int) -> tuple[grpc.aio.Server, int,
                                                                             health.aio.HealthServicer]:
    """A grpc.aio server with Generation, Health and reflection, bound (not started).

    Returns (server, bound port, health servicer).
    """
    keys = ApiKeys(service.config.api_keys)
    interceptors = [ApiKeyInterceptor(keys)] if keys.required else []
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    generation_pb2_grpc.add_GenerationServicer_to_server(GenerationServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"the router could not bind its gRPC port {host}:{port}")
    return server, bound, health_servicer
