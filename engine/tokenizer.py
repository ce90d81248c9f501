"""Tokenization for the router: encode, decode, chat templates, streaming detokenization and stop
strings. Torch-free and transformers-free: `tokenizers` for the vocabulary, `jinja2` (sandboxed)
for chat templates, so the router process stays small.

An HF model directory provides tokenizer.json (the vocabulary and pipeline), tokenizer_config.json
(special tokens, `chat_template`) and optionally generation_config.json (EOS/BOS ids) and a
chat_template.jinja file. Templates render exactly as transformers renders them (same jinja
options, filters and globals), so prompts match what HF `apply_chat_template` produces.

IncrementalDetokenizer invariant: the concatenation of every piece it returns, plus flush(),
equals `tokenizer.decode(all_ids)`. StopStringMatcher invariant: it never emits text that could be
the start of a stop string, and it never emits a stop string.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from engine.request import InvalidRequestError

log = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    return raw if isinstance(raw, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _compile_template(source: str):
    """A jinja2 template compiled the way transformers compiles chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """An HF tokenizer directory, without transformers. Build it with `Tokenizer.from_dir`."""

    def __init__(self, backend: Any, *, special_tokens: dict[str, str], chat_template: str | None,
                 eos_token_ids: Iterable[int], bos_token_id: int | None) -> None:
        self._backend = backend  # tokenizers.Tokenizer
        self.special_tokens = dict(special_tokens)  # "bos_token" -> "<s>", ...
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token_id = bos_token_id
        self._template = _compile_template(chat_template) if chat_template else None
        # Whether encode(add_special_tokens=True) puts BOS first (the post-processor decides).
        probe = backend.encode("", add_special_tokens=True).ids
        self.adds_bos = bos_token_id is not None and probe[:1] == [bos_token_id]
        self.special_token_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        # Byte-fallback pieces ("<0xE4>"): the decoder turns a whole run of them into text at
        # once (or into U+FFFD per byte when the run is not valid UTF-8), so a run's text is
        # final only once a non-byte token follows it.
        self.byte_token_ids: frozenset[int] = frozenset()
        if getattr(backend.model, "byte_fallback", False):
            vocab = backend.get_vocab(with_added_tokens=False)
            self.byte_token_ids = frozenset(
                i for tok, i in vocab.items() if _BYTE_PIECE.fullmatch(tok))

    @classmethod
    def from_dir(cls, hf_dir: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        hf_dir = Path(hf_dir)
        path = hf_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{hf_dir} has no tokenizer.json (an HF model directory is needed)")
        backend = Backend.from_file(str(path))
        config = _read_json(hf_dir / "tokenizer_config.json")
        generation = _read_json(hf_dir / "generation_config.json")
        model = _read_json(hf_dir / "config.json")

        special: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(config.get(name))
            if content is not None:
                special[name] = content

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = hf_dir / "chat_template.jinja"
        if not template and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")

        eos_ids = _as_id_list(generation.get("eos_token_id")) or _as_id_list(model.get("eos_token_id"))
        if "eos_token" in special:
            eos_id = backend.token_to_id(special["eos_token"])
            if eos_id is not None and eos_id not in eos_ids:
                eos_ids.append(eos_id)
        bos_id = None
        if "bos_token" in special:
            bos_id = backend.token_to_id(special["bos_token"])
        if bos_id is None:
            bos_ids = _as_id_list(generation.get("bos_token_id")) or _as_id_list(model.get("bos_token_id"))
            bos_id = bos_ids[0] if bos_ids else None
        return cls(backend, special_tokens=special, chat_template=template or None,
                   eos_token_ids=eos_ids, bos_token_id=bos_id)

    # -- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (the first one generation_config.json lists)."""
        eos = self.special_tokens.get("eos_token")
        eos_id = self._backend.token_to_id(eos) if eos else None
        if eos_id is not None:
            return eos_id
        return min(self.eos_token_ids) if self.eos_token_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt text for `messages`; InvalidRequestError (param "messages") when the model
        has no template or the template refuses the conversation (raise_exception)."""
        import jinja2

        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template; send a plain prompt to /v1/completions instead",
                "messages",
            )
        variables = {**self.special_tokens, **extra}
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(f"the chat template refused the messages: {exc}",
                                      "messages") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation. BOS is added only when the tokenizer normally
        adds it and the template did not already put it there."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids = self.encode(text, add_special_tokens=False)
        if self.adds_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text (vLLM's prefix/read offsets).

    Each step decodes a short window ids[prefix_offset:] and returns only the text that the
    window adds beyond ids[prefix_offset:read_offset]. Text that ends in U+FFFD (an incomplete
    UTF-8 sequence, e.g. half of a byte-level BPE character) is held until a later token
    completes it, and so is a trailing run of byte-fallback pieces (see Tokenizer.byte_token_ids). The window keeps one token of left context so decoders that strip a leading
    space at the start of a decode (SentencePiece) do not lose spaces mid-stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the new text they complete (possibly "")."""
        pieces = []
        for token_id in token_ids:
            self.token_ids.append(token_id)
            pieces.append(self._step())
        return "".join(pieces)

    def _step(self) -> str:
        if self._in_open_byte_run():
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(self.token_ids[self._prefix_offset:self._read_offset], self._skip)
        new_text = decode(self.token_ids[self._prefix_offset:], self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return new_text[len(prefix_text):]
        return ""

    def _in_open_byte_run(self) -> bool:
        """The last token that decodes to anything is a byte-fallback piece."""
        byte_ids = self._tokenizer.byte_token_ids
        if not byte_ids:
            return False
        special_ids = self._tokenizer.special_token_ids if self._skip else frozenset()
        for token_id in reversed(self.token_ids):
            if token_id not in special_ids:
                return token_id in byte_ids
        return False

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes as U+FFFD)."""
        prefix_text = self._tokenizer.decode(
            self.token_ids[self._prefix_offset:self._read_offset], self._skip)
        new_text = self._tokenizer.decode(self.token_ids[self._prefix_offset:], self._skip)
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return new_text[len(prefix_text):]


@dataclass(frozen=True)
class StopMatch:
    text: str  # text safe to emit now
    stopped: bool  # a stop string was found; `text` ends right before it
    stop: str | None = None  # the stop string that matched


class StopStringMatcher:
    """Applies OpenAI-style stop strings to streamed text.

    feed() returns the text that can be emitted now: everything up to the first stop string to
    complete (which is trimmed, and ends the stream) or, when no stop string is found, everything except the longest
    tail that could still grow into one. flush() releases that tail when the stream ends without a
    match.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> StopMatch:
        if self.stopped:
            return StopMatch("", True)
        if not self.stop:
            return StopMatch(text, False)
        buffer = self._held + text
        # The stop string that completes first wins (as if generation stopped right there);
        # among those completing at the same place, the one starting first. This makes the
        # result independent of how the text was chunked.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stop:
            index = buffer.find(s)
            if index >= 0:
                candidate = (index + len(s), index, s)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        if best is not None:
            self.stopped = True
            self._held = ""
            return StopMatch(buffer[:best[1]], True, best[2])
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return StopMatch(buffer[:len(buffer) - keep], False)

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(buffer)), longest, -1):
                if buffer.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
