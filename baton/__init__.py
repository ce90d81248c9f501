"""Baton: disaggregated LLM serving. The public Python API is the SDK:

    from baton import Client, AsyncClient

Importing `baton` is cheap: it imports neither torch nor ray; the SDK (and grpc) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SDK_NAMES = (
    "Client", "AsyncClient", "Result", "Choice", "Chunk", "TokenLogprob", "Usage", "ModelInfo",
    "BatonError",
    "BadRequestError", "AuthenticationError", "OverloadedError", "UnavailableError",
    "DeadlineExceededError",
)
__all__ = list(_SDK_NAMES)

if TYPE_CHECKING:
    from baton.client import (  # noqa: F401
        AsyncClient,
        AuthenticationError,
        BadRequestError,
        BatonError,
        Choice,
        Chunk,
        Client,
        DeadlineExceededError,
        ModelInfo,
        OverloadedError,
        Result,
        TokenLogprob,
        UnavailableError,
        Usage,
    )


def __getattr__(name: str) -> Any:
    if name in _SDK_NAMES:
        from baton import client

        return getattr(client, name)
    raise AttributeError(f"module 'baton' has no attribute {name!r}")
