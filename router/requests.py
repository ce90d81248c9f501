"""From what a client sent (HTTP or gRPC, already parsed) to a validated GenerationRequest.

Validation happens here, once, for both APIs: the request id, the model name, exactly one input
(text prompt, chat messages or token ids), token ids inside the vocabulary, sampling parameters
(the engine's SamplingParams rules), stop strings, stop token ids, the number of choices n, and
the context limit. max_tokens is capped so that prompt + output fits the context; when the client leaves it
unset it defaults to `default_max_tokens` (OpenAI: 16 for completions) or, if that is None, to
the rest of the context (chat).
Every refusal is a RouterError of kind INVALID_REQUEST naming the parameter.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from engine.request import MAX_LOGPROBS, InvalidRequestError, SamplingParams, check_prompt
from engine.tokenizer import Tokenizer
from router.errors import RouterError

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_CHOICES = 128  # n, as OpenAI
MAX_REQUEST_ID_LEN = 128
# A client's request id: none of the separators of the router's own ids, "<id>#<choice>" for the
# choices of an n > 1 request and "<id>~<attempt>" for retries, so no two requests share an id.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:/@=+-]+")
# Sampling arguments that reach SamplingParams under their own name, with their type.
NUMERIC_SAMPLING: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "seed": int, "min_p": float,
    "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
}
# The arguments of RequestBuilder.build that both APIs take under the same name (an OpenAI body
# field, a baton.v1.GenerateRequest field), None when the client left them unset.
SAMPLING_ARGS = (*NUMERIC_SAMPLING, "stop", "stop_token_ids", "ignore_eos", "n")


def check_request_id(request_id: Any) -> None:
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID_LEN:
        raise RouterError.invalid(
            f"request_id must be a string of 1 to {MAX_REQUEST_ID_LEN} characters", "request_id")
    if not _REQUEST_ID.fullmatch(request_id):
        raise RouterError.invalid(
            f"request_id {request_id!r} may hold only letters, digits and _ . : / @ = + -",
            "request_id")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    n: int = 1  # choices; choice i of a seeded request samples with seed + i
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RequestBuilder:
    def __init__(self, tokenizer: Tokenizer, *, model_name: str, max_model_len: int,
                 vocab_size: int, max_stop_strings: int = 16) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_stop_strings = max_stop_strings

    def check_model(self, model: Any, required: bool = True) -> None:
        if model is None or model == "":
            if required:
                raise RouterError.invalid(
                    f"you must provide a model parameter (this server serves {self.model_name!r})",
                    "model")
            return
        if not isinstance(model, str):
            raise RouterError.invalid(f"model must be a string, got {type(model).__name__}", "model")
        if model != self.model_name:
            raise RouterError.invalid(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                "model", code="model_not_found")

    # -- inputs ---------------------------------------------------------------------------------

    def prompt_ids_from_text(self, prompt: Any) -> list[int]:
        if not isinstance(prompt, str):
            raise RouterError.invalid(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                "prompt")
        if not prompt:
            raise RouterError.invalid("prompt must not be empty", "prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def prompt_ids_from_ids(self, ids: Any, param: str = "prompt") -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
            raise RouterError.invalid(f"{param} must be a list of integer token ids", param)
        if not ids:
            raise RouterError.invalid(f"{param} must not be empty", param)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RouterError.invalid(
                f"{param} holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size})",
                param)
        return list(ids)

    def prompt_ids_from_messages(self, messages: Any) -> list[int]:
        if not isinstance(messages, list):
            raise RouterError.invalid("messages must be a list of {role, content} objects",
                                      "messages")
        if not messages:
            raise RouterError.invalid("messages must not be empty", "messages")
        normalized = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise RouterError.invalid(f"{where} must be an object with role and content",
                                          "messages")
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise RouterError.invalid(
                    f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", "messages")
            normalized.append({"role": role, "content": self._content_text(message.get("content"),
                                                                           where)})
        try:
            return self.tokenizer.encode_chat(normalized, add_generation_prompt=True)
        except InvalidRequestError as exc:
            raise RouterError.from_invalid_request(exc) from None

    @staticmethod
    def _content_text(content: Any, where: str) -> str:
        """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise RouterError.invalid(
                        f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}}; "
                        "this model reads text only", "messages")
                texts.append(part["text"])
            return "".join(texts)
        raise RouterError.invalid(f"{where}.content must be a string or a list of text parts",
                                  "messages")

    def stop_strings(self, stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise RouterError.invalid("stop must be a string or a list of strings", "stop")
        if len(stop) > self.max_stop_strings:
            raise RouterError.invalid(
                f"stop may hold at most {self.max_stop_strings} strings, got {len(stop)}", "stop")
        if any(s == "" for s in stop):
            raise RouterError.invalid("stop strings must not be empty", "stop")
        return tuple(dict.fromkeys(stop))

    # -- the whole request ----------------------------------------------------------------------

    def stop_token_ids(self, ids: Any) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
            raise RouterError.invalid("stop_token_ids must be a list of integer token ids",
                                      "stop_token_ids")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RouterError.invalid(f"stop_token_ids holds token id {bad[0]}, outside the "
                                      f"vocabulary [0, {self.vocab_size})", "stop_token_ids")
        return tuple(dict.fromkeys(ids))

    def build(self, request_id: str, prompt_token_ids: Sequence[int], *,
              max_tokens: Any = None, default_max_tokens: int | None = 16, stop: Any = None,
              ignore_eos: Any = False, max_tokens_param: str = "max_tokens",
              prompt_param: str = "prompt", logprobs: Any = None,
              logprobs_param: str = "logprobs", max_logprobs: int = MAX_LOGPROBS,
              stop_token_ids: Any = None, n: Any = None, **sampling: Any) -> GenerationRequest:
        """sampling: the arguments named in NUMERIC_SAMPLING, None for unset (SamplingParams'
        default). logprobs: None for none, else the number of alternatives per token, refused
        above max_logprobs under the name logprobs_param (OpenAI's completions allow 5, chat 20)."""
        check_request_id(request_id)
        unknown = sorted(set(sampling) - NUMERIC_SAMPLING.keys())
        if unknown:
            raise TypeError(f"unknown sampling arguments: {', '.join(unknown)}")
        values = {name: value for name, value in sampling.items() if value is not None}
        for name, value, is_int in (
            *((name, value, NUMERIC_SAMPLING[name] is int) for name, value in values.items()),
            (max_tokens_param, max_tokens, True),
            (logprobs_param, logprobs, True),
            ("n", n, True),
        ):
            if value is not None and not (_is_int(value) if is_int else _is_number(value)):
                kind = "an integer" if is_int else "a number"
                raise RouterError.invalid(f"{name} must be {kind}, got {value!r}", name)
        if not isinstance(ignore_eos, bool):
            raise RouterError.invalid(f"ignore_eos must be true or false, got {ignore_eos!r}",
                                      "ignore_eos")
        if logprobs is not None and not 0 <= logprobs <= max_logprobs:
            raise RouterError.invalid(
                f"{logprobs_param} must be in [0, {max_logprobs}], got {logprobs}", logprobs_param)
        if n is not None and not 1 <= n <= MAX_CHOICES:
            raise RouterError.invalid(f"n must be in [1, {MAX_CHOICES}], got {n}", "n")
        num_prompt = len(prompt_token_ids)
        room = self.max_model_len - num_prompt
        requested = max_tokens if max_tokens is not None else default_max_tokens
        try:
            sampling = SamplingParams(
                **{name: NUMERIC_SAMPLING[name](value) for name, value in values.items()},
                max_tokens=requested if requested is not None else max(room, 1),
                stop_token_ids=self.stop_token_ids(stop_token_ids),
                ignore_eos=ignore_eos,
                logprobs=logprobs,
            )
            check_prompt(num_prompt, sampling.max_tokens, self.max_model_len)
        except InvalidRequestError as exc:
            message, param = str(exc), exc.param
            if param == "max_tokens":
                message, param = message.replace("max_tokens", max_tokens_param), max_tokens_param
            elif param == "prompt":
                param = prompt_param
            raise RouterError.invalid(message, param) from None
        if sampling.max_tokens > room:
            sampling = replace(sampling, max_tokens=room)
        return GenerationRequest(request_id=request_id, prompt_token_ids=tuple(prompt_token_ids),
                                 sampling=sampling, stop=self.stop_strings(stop), n=n or 1)
