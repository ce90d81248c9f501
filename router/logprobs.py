"""OpenAI's logprobs shapes, built from the engine's TokenLogprob records.

Chat completions: choices[i].logprobs = {"content": [{token, logprob, bytes, top_logprobs:
[{token, logprob, bytes}, ...]}, ...], "refusal": null}. Completions: choices[i].logprobs =
{tokens, token_logprobs, top_logprobs: [{token: logprob}, ...], text_offset}, text_offset being
each token's character offset in the choice's text, carried across streamed chunks by
CompletionLogprobs. A token's string is its own decoding (special tokens kept); a token holding
part of a multi-byte character reads as U+FFFD, as in OpenAI's API. Logprobs are floored at
-9999 so that JSON never carries -Infinity (vLLM does the same).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.request import TokenLogprob
from engine.tokenizer import Tokenizer

_MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


class TokenTexts:
    """token id -> its text, memoized (bounded by the vocabulary)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text

    def chat_content(self, logprobs: Sequence[TokenLogprob]) -> list[dict]:
        return [{**self._entry(lp.token_id, lp.logprob),
                 "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in logprobs]

    def chat_logprobs(self, logprobs: Sequence[TokenLogprob]) -> dict:
        return {"content": self.chat_content(logprobs), "refusal": None}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


class CompletionLogprobs:
    """One choice's completions-API logprobs, chunk by chunk (text offsets carry over)."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.text_offset = 0

    def block(self, logprobs: Sequence[TokenLogprob]) -> dict:
        tokens, offsets = [], []
        for lp in logprobs:
            text = self.texts(lp.token_id)
            tokens.append(text)
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
            "top_logprobs": [{self.texts(t): _finite(v) for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }
