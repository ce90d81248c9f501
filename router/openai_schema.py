"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Scalar fields are typed strictly, so "temperature": "hot" fails validation and comes back as a
400 naming the field (see router.http_api). The inputs (prompt, messages, stop) are kept loose
here and checked by router.requests.RequestBuilder, which gives clearer messages and is shared
with the gRPC API. Unknown fields are ignored, as OpenAI-compatible servers usually do; known
fields Baton does not implement are refused when set to anything but their neutral value.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from router.errors import RouterError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: Any = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = None
    ignore_eos: bool = False  # extension (vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(_SamplingBody):
    prompt: Any = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_SamplingBody):
    messages: Any = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def check_unsupported(body: _SamplingBody) -> None:
    """Refuse what Baton does not implement yet, rather than silently ignoring it."""
    if body.n not in (None, 1):
        raise RouterError.invalid(f"n must be 1 (one choice per request is supported), got {body.n}",
                                  "n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise RouterError.invalid(f"{name} is not supported yet; leave it unset or 0", name)
    if body.logit_bias:
        raise RouterError.invalid("logit_bias is not supported yet", "logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise RouterError.invalid("echo is not supported yet", "echo")
        if body.logprobs is not None:
            raise RouterError.invalid("logprobs is not supported yet", "logprobs")
        if body.best_of not in (None, 1):
            raise RouterError.invalid("best_of must be 1", "best_of")
        if body.suffix:
            raise RouterError.invalid("suffix is not supported", "suffix")
    if isinstance(body, ChatCompletionRequest):
        if body.logprobs or body.top_logprobs:
            raise RouterError.invalid("logprobs is not supported yet", "logprobs")
        if body.tools:
            raise RouterError.invalid("tools are not supported yet", "tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise RouterError.invalid("only response_format {\"type\": \"text\"} is supported",
                                      "response_format")
