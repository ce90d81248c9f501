"""router.logprobs.TextOffsets: each token's offset in the text the incremental detokenizer
returns, under byte-level BPE and SentencePiece (leading "▁", byte fallback) tokenizers."""

from __future__ import annotations

import pytest

from engine.tokenizer import IncrementalDetokenizer, Tokenizer
from router.logprobs import TextOffsets
from tests.support.tiny_tokenizer import byte_level_dir, sentencepiece_dir

pytestmark = pytest.mark.unit

TEXTS = [
    "Hello world! The capital of France is Paris.",
    "Ünïcödé: café, 中文字符 🙂 and 3.14159",
    "  leading spaces, then STOP.",
]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    build = byte_level_dir if request.param == "byte_level" else sentencepiece_dir
    return Tokenizer.from_dir(build(tmp_path_factory.mktemp(request.param)))


def offsets_of(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    offsets = TextOffsets(tokenizer)
    pieces, result = [], []
    for token_id in ids:
        pieces.append(detokenizer.add([token_id]))
        result.append(offsets.add(token_id, pieces[-1]))
    return "".join(pieces) + detokenizer.flush(), result


@pytest.mark.parametrize("text", TEXTS)
def test_offsets_are_where_each_token_starts_in_the_text(tokenizer, text) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    got_text, offsets = offsets_of(tokenizer, ids)
    assert got_text == tokenizer.decode(ids)
    # Token i starts after the complete characters of tokens 0..i-1.
    assert offsets == [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def test_a_lone_sentencepiece_token_loses_its_space_but_its_offset_does_not(tmp_path) -> None:
    sp = Tokenizer.from_dir(sentencepiece_dir(tmp_path))
    ids = sp.encode("Hello world", add_special_tokens=False)
    # The token that begins " world" (how the trained vocabulary splits the words may vary).
    i = next(i for i in range(1, len(ids)) if sp.decode(ids[:i]) == "Hello")
    assert sp.decode(ids[: i + 1]).startswith("Hello w")
    assert sp.decode(ids[i : i + 1]).startswith("w")  # alone: no space
    _, offsets = offsets_of(sp, ids)
    assert offsets[i] == len("Hello")  # its text " w..." starts right after "Hello"
