"""Request-level types shared by the engine, the workers and the router. Torch-free.

A request's life on one engine: WAITING (needs prefill) or WAITING_FOR_KV (its blocks are reserved
and a prefill worker is pushing the KV) -> RUNNING (in the batch) -> FINISHED. The router works
with the same SamplingParams, so a bad value is refused with the same message everywhere.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id, or (router-side) a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    FINISHED = "finished"


class InvalidRequestError(ValueError):
    """A request the engine can never serve. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NoCapacityError(RuntimeError):
    """No KV blocks free right now; the caller may retry later or elsewhere."""


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # [-2, 2], on output tokens (OpenAI)
    frequency_penalty: float = 0.0  # [-2, 2], on output token counts (OpenAI)
    repetition_penalty: float = 1.0  # > 0, 1 = off, on prompt + output tokens (vLLM)
    min_p: float = 0.0  # [0, 1], 0 = off (vLLM)
    logprobs: int | None = None  # None = none; k = the sampled token's plus the k most likely

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):  # also refuses NaN
            raise InvalidRequestError(
                f"temperature must be >= 0, got {self.temperature}", "temperature"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}", "top_k")
        if self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be > 0, got {self.max_tokens}", "max_tokens")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}", "seed")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-2.0 <= value <= 2.0):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}", name)
        if not (0.0 < self.repetition_penalty < math.inf):
            raise InvalidRequestError(
                f"repetition_penalty must be a finite number > 0 (1 disables it), "
                f"got {self.repetition_penalty}", "repetition_penalty")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


def check_prompt(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Refuse prompts that are empty or can never fit in the model's context."""
    if num_prompt_tokens == 0:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {num_prompt_tokens} tokens, but the model's context is "
            f"{max_model_len} tokens and at least one must be left for the output",
            "prompt",
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model's raw logits (before penalties and
    temperature), with the `top` most likely tokens as (token_id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What one engine step produced for one request. logprobs, when the request asked for them,
    holds one entry per new token. The output carrying the first token also says how many prompt
    tokens were found in the prefix cache (num_cached_tokens; None on later outputs)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
