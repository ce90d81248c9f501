"""engine.tokenizer: HF directories without transformers, streaming detokenization, stop strings,
chat templates."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.request import InvalidRequestError
from engine.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer
from tests.support.tiny_tokenizer import byte_level_dir, sentencepiece_dir

pytestmark = pytest.mark.unit

MULTIBYTE_TEXT = "café 中文字符 🙂🚀 naïve Straße ≠ ∞ 👍🏽 日本語"


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(byte_level_dir(tmp_path_factory.mktemp("byte_level")))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(sentencepiece_dir(tmp_path_factory.mktemp("sentencepiece")))


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream_decode(tokenizer: Tokenizer, ids: list[int], chunk_sizes: list[int] | None = None,
                  skip_special_tokens: bool = True) -> str:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    pieces, i = [], 0
    sizes = chunk_sizes or [1]
    while i < len(ids):
        n = sizes[len(pieces) % len(sizes)]
        pieces.append(detok.add(ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    return "".join(pieces)


# -- loading and encoding ---------------------------------------------------------------------


def test_special_tokens_from_config(byte_level: Tokenizer, sentencepiece: Tokenizer) -> None:
    assert byte_level.eos_token_id == byte_level.token_to_id("<|im_end|>")
    assert byte_level.eos_token_ids == frozenset({byte_level.token_to_id("<|im_end|>")})
    assert byte_level.bos_token_id == byte_level.token_to_id("<|im_start|>")
    assert not byte_level.adds_bos
    # tokenizer_config.json writes the BOS as {"content": "<s>"}; the post-processor adds it
    assert sentencepiece.bos_token_id == sentencepiece.token_to_id("<s>")
    assert sentencepiece.adds_bos
    assert sentencepiece.eos_token_id == sentencepiece.token_to_id("</s>")


def test_encode_decode_roundtrip(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == MULTIBYTE_TEXT
    with_bos = tokenizer.encode(MULTIBYTE_TEXT)
    assert with_bos[:1] == ([tokenizer.bos_token_id] if tokenizer.adds_bos else ids[:1])


def test_eos_ids_merge_generation_config(tmp_path) -> None:
    d = byte_level_dir(tmp_path / "t")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == frozenset({0, 2})
    assert tok.eos_token_id == 2  # the tokenizer's own eos_token comes first


def test_missing_tokenizer_json_names_the_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_import_is_torch_and_transformers_free() -> None:
    code = ("import sys, engine.tokenizer; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- incremental detokenization -----------------------------------------------------------------


def test_incremental_equals_full_decode_on_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE_TEXT + " and more text, STOP.", add_special_tokens=False)
    for sizes in ([1], [2], [3, 1], [len(ids)]):
        assert stream_decode(tokenizer, ids, sizes) == tokenizer.decode(ids)


def test_incremental_holds_back_partial_characters(byte_level: Tokenizer) -> None:
    emoji_bytes_ids = byte_level.encode("🙂", add_special_tokens=False)
    # the tiny vocabulary has no merge for this emoji's 4 bytes as one token
    if len(emoji_bytes_ids) < 2:
        pytest.skip("the emoji is a single token in this vocabulary")
    detok = IncrementalDetokenizer(byte_level)
    pieces = [detok.add([i]) for i in emoji_bytes_ids]
    assert pieces[:-1] == [""] * (len(pieces) - 1)  # nothing half-decoded leaks out
    assert pieces[-1] == "🙂"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_equals_full_decode_on_random_ids(tokenizer: Tokenizer, data) -> None:
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), min_size=0, max_size=40))
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    skip = data.draw(st.booleans())
    assert stream_decode(tokenizer, ids, sizes, skip) == tokenizer.decode(ids, skip)


def test_incremental_on_random_multibyte_heavy_ids(tokenizer: Tokenizer) -> None:
    # ids drawn from the tokens of multi-byte text: pieces of characters in random order
    pool = sorted(set(tokenizer.encode(MULTIBYTE_TEXT * 2, add_special_tokens=False)))
    if tokenizer.byte_token_ids:
        pool += sorted(tokenizer.byte_token_ids)[0x80:]  # high bytes: UTF-8 lead/continuation
    rng = random.Random(1234)
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 25))]
        assert stream_decode(tokenizer, ids) == tokenizer.decode(ids)


def test_special_tokens_skipped_in_stream(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("Hello", add_special_tokens=False) + [byte_level.eos_token_id]
    assert stream_decode(byte_level, ids) == "Hello"
    assert stream_decode(byte_level, ids, skip_special_tokens=False) == "Hello<|im_end|>"


# -- stop strings -------------------------------------------------------------------------------


def feed_all(stop: list[str], chunks: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop)
    out = []
    for chunk in chunks:
        match = matcher.feed(chunk)
        out.append(match.text)
        if match.stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


@pytest.mark.parametrize("chunks, expected", [
    (["Hello STOP world"], ("Hello ", True)),
    (["Hello ST", "OP world"], ("Hello ", True)),
    (["Hello S", "T", "O", "P"], ("Hello ", True)),
    (["STOP"], ("", True)),
    (["Hello ST", "ART"], ("Hello START", False)),
    (["no stop here"], ("no stop here", False)),
    (["ends with ST"], ("ends with ST", False)),  # held back, released by flush()
])
def test_stop_strings_across_chunks(chunks, expected) -> None:
    assert feed_all(["STOP"], chunks) == expected


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopStringMatcher(["\n\nUser:", "###"])
    assert matcher.feed("abc\n").text == "abc"  # "\n" may start "\n\nUser:"
    assert matcher.feed("\nUs").text == ""
    match = matcher.feed("x")  # "\n\nUsx" cannot be the stop any more
    assert match == type(match)("\n\nUsx", False)
    assert matcher.feed("#").text == ""
    assert matcher.feed("## tail") .text == ""  # "###" matched
    assert matcher.stopped


def test_first_stop_string_to_complete_wins() -> None:
    match = StopStringMatcher(["world", "lo w"]).feed("hello world")
    assert (match.text, match.stopped, match.stop) == ("hel", True, "lo w")
    # "a" completes before "OaO" does, although "OaO" starts first: generation stops at "a"
    assert feed_all(["OaO", "a"], ["OOaO"]) == feed_all(["OaO", "a"], ["OOa", "O"]) == ("OO", True)
    # two stops completing at the same place: the longer (earlier-starting) one is trimmed
    assert feed_all(["b", "ab"], ["xab"]) == ("x", True)


def test_no_stop_strings_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything").text == "anything"
    assert matcher.flush() == ""


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abcST OP\n", max_size=40),
       cuts=st.lists(st.integers(0, 40), max_size=8),
       stops=st.lists(st.text(alphabet="abST OP\n", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_matcher_equals_one_shot_search(text, cuts, stops) -> None:
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
    expected = (text[:min(hits)[1]], True) if hits else (text, False)
    assert feed_all(stops, chunks) == expected


# -- chat templates -----------------------------------------------------------------------------


def test_chatml_template_renders_like_transformers(byte_level: Tokenizer) -> None:
    text = byte_level.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_prompt = byte_level.apply_chat_template([{"role": "user", "content": "Hi"}],
                                               add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")
    ids = byte_level.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == byte_level.token_to_id("<|im_start|>")  # special tokens parsed as such
    assert byte_level.decode(ids, skip_special_tokens=False) == text


def test_template_bos_is_not_doubled(sentencepiece: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = sentencepiece.apply_chat_template(messages)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    ids = sentencepiece.encode_chat(messages)
    bos = sentencepiece.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == 1


def test_bos_added_when_template_lacks_it(tmp_path) -> None:
    d = sentencepiece_dir(tmp_path / "sp")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(d)
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_template_raise_exception_is_invalid_request(sentencepiece: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="roles must alternate") as info:
        sentencepiece.apply_chat_template([{"role": "user", "content": "a"},
                                           {"role": "user", "content": "b"}])
    assert info.value.param == "messages"


def test_template_from_jinja_file_and_sandbox(tmp_path) -> None:
    d = byte_level_dir(tmp_path / "bl")
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}"
        "{{ bos_token }}")
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '[user]"é"<|im_start|>'
    (d / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):  # the sandbox refuses attribute escapes
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}])


def test_no_template_is_a_clear_error(tmp_path) -> None:
    d = byte_level_dir(tmp_path / "bl")
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidRequestError, match="no chat template"):
        Tokenizer.from_dir(d).encode_chat([{"role": "user", "content": "x"}])
