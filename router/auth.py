"""API keys for the router's public API: HTTP `Authorization: Bearer <key>` on /v1/*, gRPC
`authorization: Bearer <key>` metadata on baton.v1.Generation. /cluster (worker addresses) wants
a key too.

ApiKeys holds the configured keys (none configured: every call is let in). A key is compared in
constant time against each configured one. Health checks, reflection, /health, /metrics and
/prometheus/targets stay open: probes and scrapers carry no key. Workers take no API key: they
serve only calls carrying their cluster's token (baton/cluster_token.py). Refusals are 401 (HTTP, with
`WWW-Authenticate: Bearer`) and UNAUTHENTICATED (gRPC); the message never echoes the key sent.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

import grpc
import grpc.aio

from baton.cluster_token import handler_like

GENERATION_SERVICE = "/baton.v1.Generation/"


class ApiKeys:
    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(key.encode() for key in keys)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """None when the header (or metadata) value lets the call in, else why not."""
        if not self._keys:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return "an API key is required: send it as 'Authorization: Bearer <key>'"
        sent = key.strip().encode()
        # every key compared, whichever matches: the time taken says nothing of which one
        matches = [hmac.compare_digest(sent, known) for known in self._keys]
        if not any(matches):
            return "the API key is not valid"
        return None


def read_keys_file(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text().splitlines()
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API key (one per line)")
    return keys


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses baton.v1.Generation calls without a valid key with UNAUTHENTICATED."""

    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(GENERATION_SERVICE):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        why = self._keys.check(metadata.get("authorization"))
        handler = await continuation(handler_call_details)
        if why is None or handler is None:  # None: no such method, answered UNIMPLEMENTED
            return handler
        return _refusing(handler, why)


def _refusing(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover  (makes this an async generator, as the streaming handler is)

    return handler_like(handler, refuse, refuse_stream)
