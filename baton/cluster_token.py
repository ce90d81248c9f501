"""The cluster token: a shared secret every internal gRPC call carries, so a worker serves only its
own cluster's router and prefill workers.

`baton serve` draws a fresh token at start and hands it to every actor; a worker started on its own
(`python -m prefill_worker|decode_worker`) takes BATON_CLUSTER_TOKEN. With a token, a worker's
server refuses baton.v1.* calls (Decode, Prefill, KVTransfer) whose `x-baton-cluster-token`
metadata does not match, with UNAUTHENTICATED; health checks stay open for probes. Clients attach
the token to every call of a channel (token_channel, aio_token_channel). No token: nothing is
checked or sent.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from baton.wire import GRPC_OPTIONS

if TYPE_CHECKING:
    from baton.cluster_tls import ClusterTLS

METADATA_KEY = "x-baton-cluster-token"
ENV_VAR = "BATON_CLUSTER_TOKEN"
_INTERNAL_SERVICES = "/baton.v1."


def from_env() -> str | None:
    return os.environ.get(ENV_VAR) or None


class TokenCheck(grpc.ServerInterceptor):
    """Server side (a worker's grpc.server): refuses internal calls without the token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_INTERNAL_SERVICES):
            return handler
        sent = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY, "")
        if hmac.compare_digest(sent.encode(), self._token):
            return handler
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    why = "this worker serves only its own cluster: the call lacks the cluster token"

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    def refuse_stream(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover  (a generator, as a streaming handler is)

    return handler_like(handler, refuse, refuse_stream)


def handler_like(handler: grpc.RpcMethodHandler, unary, streaming) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler` that runs `unary` (unary
    responses) or `streaming` (a generator, for streamed responses) instead."""
    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


def _with_token(details, token: str):
    metadata = [*(details.metadata or ()), (METADATA_KEY, token)]
    return details._replace(metadata=metadata)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_token(details, self._token), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self._token), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_token(details, self._token), request_iterator)


def token_channel(address: str, token: str | None, tls: ClusterTLS | None = None) -> grpc.Channel:
    """A channel to a worker whose every call carries the token (when there is one), over mutual
    TLS when tls is given (baton/cluster_tls.py)."""
    if tls is None:
        channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
    else:
        channel = grpc.secure_channel(address, tls.channel_credentials(),
                                      options=[*GRPC_OPTIONS, *tls.channel_options()])
    return grpc.intercept_channel(channel, _SyncToken(token)) if token else channel


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_token(details, self._token), request)


def aio_token_channel(address: str, token: str | None,
                      tls: ClusterTLS | None = None) -> grpc.aio.Channel:
    """token_channel for asyncio (the router's unary and server-streaming calls)."""
    interceptors = [_AioUnaryUnary(token), _AioUnaryStream(token)] if token else None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                   options=[*GRPC_OPTIONS, *tls.channel_options()],
                                   interceptors=interceptors)
