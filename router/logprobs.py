"""OpenAI's logprobs shapes, built from the engine's TokenLogprob records.

Chat completions: choices[i].logprobs = {"content": [{token, logprob, bytes, top_logprobs:
[{token, logprob, bytes}, ...]}, ...], "refusal": null}. Completions: choices[i].logprobs =
{tokens, token_logprobs, top_logprobs: [{token: logprob}, ...], text_offset}, text_offset being
where each token's text starts in the choice's text, in characters. Offsets come from the text the
detokenizer really added per token, not from tokens' lone decodings, which differ for SentencePiece
tokens ("▁x" alone decodes to "x", after another token to " x"). A token's string is its own
decoding (special tokens kept); a token holding part of a multi-byte character reads as U+FFFD, as
in OpenAI's API. Logprobs are floored at
-9999 so that JSON never carries -Infinity (vLLM does the same).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.request import TokenLogprob
from engine.tokenizer import Tokenizer

_MIN_LOGPROB = -9999.0
_REPLACEMENT_CHAR = "\ufffd"


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


def completion_logprobs(texts: TokenTexts, logprobs: Sequence[TokenLogprob],
                        text_offsets: Sequence[int]) -> dict:
    """A completions-API logprobs block; text_offsets[i] is where token i's text starts in the
    choice's text (router.service computes them from the detokenizer's actual deltas)."""
    return {
        "tokens": [texts(lp.token_id) for lp in logprobs],
        "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [{texts(t): _finite(v) for t, v in lp.top} for lp in logprobs],
        "text_offset": list(text_offsets),
    }


class TextOffsets:
    """Where each token's text starts in a choice's text (characters), from the text the
    incremental detokenizer really returned per token: add(token_id, piece) for every token, in
    order, with the piece the detokenizer returned for it.

    A token whose text the detokenizer holds back (part of a character, a byte-fallback run, or
    nothing yet) returns ""; the tokens after it start where the held tokens' text will end,
    measured by decoding them after one token of left context (as the detokenizer does) without
    their incomplete trailing character. Costs extra decodes only while text is held.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.num_chars = 0  # text returned so far
        self._context: list[int] = []  # the last token whose text was returned
        self._held: list[int] = []  # tokens since, whose text is held back

    def add(self, token_id: int, piece: str) -> int:
        offset = self.num_chars
        if self._held:
            base = self.tokenizer.decode(self._context, self._skip)
            held = self.tokenizer.decode(self._context + self._held, self._skip)
            offset += max(0, len(held.rstrip(_REPLACEMENT_CHAR)) - len(base))
        if piece:
            self.num_chars += len(piece)
            self._context, self._held = [token_id], []
        else:
            self._held.append(token_id)
        return offset
