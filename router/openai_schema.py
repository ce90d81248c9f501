"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types).

Scalar fields are typed strictly, so "temperature": "hot" fails validation and comes back as a
400 naming the field (see router.http_api). The inputs (prompt, messages, stop) are kept loose
here and checked by router.requests.RequestBuilder, which gives clearer messages and is shared
with the gRPC API. Unknown fields are ignored, as OpenAI-compatible servers usually do; known
fields Baton does not implement (logit_bias, echo, best_of, suffix, tools, structured output) are
refused when set to anything but their neutral value. vLLM's extensions top_k, min_p,
repetition_penalty, stop_token_ids and ignore_eos are accepted.
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
    repetition_penalty: float | None = None  # extension (vLLM)
    min_p: float | None = None  # extension (vLLM)
    stop_token_ids: list[int] | None = None  # extension (vLLM)
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
    if body.logit_bias:
        raise RouterError.invalid("logit_bias is not supported yet", "logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise RouterError.invalid("echo is not supported yet", "echo")
        if body.best_of not in (None, 1, body.n):
            raise RouterError.invalid("best_of must be unset, 1 or equal to n", "best_of")
        if body.suffix:
            raise RouterError.invalid("suffix is not supported", "suffix")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise RouterError.invalid("top_logprobs requires logprobs to be true",
                                      "top_logprobs")
        if body.tools:
            raise RouterError.invalid("tools are not supported yet", "tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise RouterError.invalid("only response_format {\"type\": \"text\"} is supported",
                                      "response_format")
