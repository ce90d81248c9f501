"""What `baton bench serve` sends, and when: synthetic workloads, ShareGPT files, Poisson arrivals.

Everything here is a pure function of the seed (and the file, for ShareGPT): the same seed gives
the same prompts, the same max_tokens and the same arrival times, on any machine. Arrivals draw
from their own generator, so changing --request-rate never changes the prompts.

Lengths are in tokens. Without a tokenizer a synthetic prompt of n tokens is n words drawn from
WORDS, common English words that are each a single token (after a space) in SmolLM2's byte-level
BPE vocabulary, as in most BPE vocabularies of that kind; the server's chat template adds its
own few tokens. Text from a file is counted as one token per 4 characters. With a tokenizer
(--tokenizer DIR) synthetic prompts are cut to exactly n tokens and every count is the
tokenizer's. Every range below is inclusive, drawn uniformly:

  chat           prompt 32..512, output 16..256
  shared-prefix  num_prefixes system prompts (default 4) of prefix_tokens (default 1024) + a
                 question of 16..64; output 32..128. Every prefix serves the same number of
                 requests (the first ones one more when they do not divide evenly), in a seeded
                 random order
  long-prompt    every 4th request (the 4th, 8th, ...) a long prompt of 1800..2200 with output
                 8..32; the others a short prompt of 16..64 with a long output of 256..512, so the
                 long prompts arrive while those decode
  mixed          each request one of the four kinds above (chat, shared-prefix, long prompt,
                 long output) at random, equally likely

A ShareGPT file is JSON lines (or one JSON list) of {"conversations": [{"from": "human",
"value": ...}, {"from": "gpt", "value": ...}, ...]}: the prompt is the first human turn, max_tokens
the length of the gpt turn that answers it. Conversations without such a pair are skipped; they
are shuffled with the seed and the first --num-requests taken. max_tokens of every request is
capped at max_output_tokens.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

WORKLOADS = ("chat", "shared-prefix", "long-prompt", "mixed")
CHARS_PER_TOKEN = 4  # the usual rough count of English text without a tokenizer

# (low, high) token counts, inclusive; the module docstring documents them
CHAT_PROMPT, CHAT_OUTPUT = (32, 512), (16, 256)
NUM_SHARED_PREFIXES, SHARED_PREFIX_LEN = 4, 1024  # the defaults of num_prefixes, prefix_tokens
SHARED_QUESTION, SHARED_OUTPUT = (16, 64), (32, 128)
LONG_PROMPT, LONG_PROMPT_OUTPUT = (1800, 2200), (8, 32)
LONG_DECODE_PROMPT, LONG_DECODE_OUTPUT = (16, 64), (256, 512)
LONG_PROMPT_EVERY = 4

_WORD_LIST = """
the of and to in is it you that he was for on are with as his they be at one have this from or had
by word but what some we can out other were all there when up use your how said an each she which
do their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line turn cause much mean before move right boy old too same tell
does set three want air well also play small end put home read hand port large add even land here
must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story far sea draw left late run while press
close night real life few north open together next white children begin got walk example paper
group always music those both mark often letter until mile river car feet care second book science
eat room friend idea fish stop once base horse cut watch color face wood main enough
"""
WORDS = tuple(_WORD_LIST.split())


class TextTokenizer(Protocol):
    """What the workloads need of a tokenizer (engine.tokenizer.Tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class WorkloadRequest:
    kind: str  # chat, shared-prefix, long-prompt, long-decode or sharegpt
    prompt: str  # the user message
    max_tokens: int
    num_prompt_tokens: int  # of system + prompt: estimated, or counted with a tokenizer
    system: str | None = None  # a system message before the prompt (shared-prefix)


def count_tokens(text: str, tokenizer: TextTokenizer | None) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return max(1, round(len(text) / CHARS_PER_TOKEN))


class _Synthesizer:
    """Word prompts of given token lengths from one seeded generator."""

    def __init__(self, seed: int, tokenizer: TextTokenizer | None, max_output_tokens: int) -> None:
        self.rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.max_output_tokens = max_output_tokens

    def text(self, num_tokens: int) -> tuple[str, int]:
        """About num_tokens of words (exactly, with a tokenizer) and their token count."""
        text = " ".join(self.rng.choice(WORDS) for _ in range(num_tokens))
        if self.tokenizer is None:
            return text, num_tokens
        ids = self.tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
        text = self.tokenizer.decode(ids)
        return text, count_tokens(text, self.tokenizer)

    def draw(self, bounds: tuple[int, int]) -> int:
        return self.rng.randint(*bounds)

    def request(self, kind: str, prompt_len: tuple[int, int], output_len: tuple[int, int],
                system: tuple[str, int] | None = None) -> WorkloadRequest:
        prompt, num_tokens = self.text(self.draw(prompt_len))
        max_tokens = min(self.draw(output_len), self.max_output_tokens)
        if system is None:
            return WorkloadRequest(kind, prompt, max_tokens, num_tokens)
        return WorkloadRequest(kind, prompt, max_tokens, num_tokens + system[1], system[0])

    def make(self, kind: str, system: tuple[str, int] | None = None) -> WorkloadRequest:
        if kind == "chat":
            return self.request(kind, CHAT_PROMPT, CHAT_OUTPUT)
        if kind == "shared-prefix":
            return self.request(kind, SHARED_QUESTION, SHARED_OUTPUT, system)
        if kind == "long-prompt":
            return self.request(kind, LONG_PROMPT, LONG_PROMPT_OUTPUT)
        return self.request("long-decode", LONG_DECODE_PROMPT, LONG_DECODE_OUTPUT)


def balanced_order(num_items: int, num_groups: int, rng: random.Random) -> list[int]:
    """A group index per item: every group num_items // num_groups times, the first
    num_items % num_groups groups once more, shuffled with rng."""
    order = [g for g in range(num_groups)
             for _ in range(num_items // num_groups + (g < num_items % num_groups))]
    rng.shuffle(order)
    return order


def synthesize(workload: str, num_requests: int, seed: int, *, max_output_tokens: int = 1 << 30,
               tokenizer: TextTokenizer | None = None, num_prefixes: int = NUM_SHARED_PREFIXES,
               prefix_tokens: int = SHARED_PREFIX_LEN) -> list[WorkloadRequest]:
    """num_requests requests of a named workload (WORKLOADS), the same for the same seed;
    num_prefixes and prefix_tokens shape the shared-prefix requests (module docstring)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    for name, value in (("num_prefixes", num_prefixes), ("prefix_tokens", prefix_tokens)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    synth = _Synthesizer(seed, tokenizer, max_output_tokens)
    if workload == "mixed":
        all_kinds = ("chat", "shared-prefix", "long-prompt", "long-decode")
        kinds = [synth.rng.choice(all_kinds) for _ in range(num_requests)]
    elif workload == "long-prompt":
        kinds = ["long-prompt" if i % LONG_PROMPT_EVERY == LONG_PROMPT_EVERY - 1 else "long-decode"
                 for i in range(num_requests)]
    else:
        kinds = [workload] * num_requests
    num_shared = kinds.count("shared-prefix")
    prefixes = [synth.text(prefix_tokens) for _ in range(num_prefixes)] if num_shared else []
    prefix_order = iter(balanced_order(num_shared, num_prefixes, synth.rng))
    return [synth.make(kind, prefixes[next(prefix_order)] if kind == "shared-prefix" else None)
            for kind in kinds]


def _conversations(path: Path) -> list[tuple[int, object]]:
    """(line number, the "conversations" value) of each entry of a JSONL or JSON-list file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the workload file {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            entries = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        where = "entry"
    else:
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a JSON line: {exc}") from None
        where = "line"
    result = []
    for number, entry in entries:
        is_record = isinstance(entry, dict) and isinstance(entry.get("conversations"), list)
        if not is_record:
            raise ValueError(f"{path}: {where} {number} is not a ShareGPT record: expected "
                             '{"conversations": [{"from": "human", "value": ...}, ...]}')
        result.append((number, entry["conversations"]))
    return result


def _first_exchange(turns: list, path: Path, number: int) -> tuple[str, str] | None:
    """The first human turn and the gpt turn right after it, or None when there is no such pair."""
    for turn in turns:
        is_turn = (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                   and isinstance(turn.get("value"), str))
        if not is_turn:
            raise ValueError(f"{path}: record {number} has a turn that is not "
                             '{"from": str, "value": str}: ' + repr(turn)[:100])
    for i in range(len(turns) - 1):
        if turns[i]["from"] == "human" and turns[i + 1]["from"] == "gpt":
            if turns[i]["value"].strip() and turns[i + 1]["value"].strip():
                return turns[i]["value"], turns[i + 1]["value"]
            return None
    return None


def load_sharegpt(path: Path, num_requests: int, seed: int, *, max_output_tokens: int = 1 << 30,
                  tokenizer: TextTokenizer | None = None) -> list[WorkloadRequest]:
    """num_requests requests from a ShareGPT file, chosen with the seed (module docstring)."""
    pairs = []
    for number, turns in _conversations(path):
        pair = _first_exchange(turns, path, number)
        if pair is not None:
            pairs.append(pair)
    if len(pairs) < num_requests:
        raise ValueError(f"{path} has {len(pairs)} usable conversations (a human turn answered by "
                         f"a gpt turn), fewer than num_requests={num_requests}")
    random.Random(seed).shuffle(pairs)
    return [WorkloadRequest("sharegpt", prompt, min(count_tokens(answer, tokenizer), max_output_tokens),
                            count_tokens(prompt, tokenizer))
            for prompt, answer in pairs[:num_requests]]


def make_workload(workload: str, num_requests: int, seed: int, *, max_output_tokens: int,
                  tokenizer: TextTokenizer | None = None, num_prefixes: int = NUM_SHARED_PREFIXES,
                  prefix_tokens: int = SHARED_PREFIX_LEN) -> list[WorkloadRequest]:
    """A named workload, or a ShareGPT file when workload is not one of WORKLOADS."""
    if workload in WORKLOADS:
        return synthesize(workload, num_requests, seed, max_output_tokens=max_output_tokens,
                          tokenizer=tokenizer, num_prefixes=num_prefixes,
                          prefix_tokens=prefix_tokens)
    return load_sharegpt(Path(workload), num_requests, seed, max_output_tokens=max_output_tokens,
                         tokenizer=tokenizer)


def arrival_times(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: a Poisson process of request_rate
    per second (exponential gaps, the first request at 0), or all at 0 for an infinite rate."""
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(f"arrivals:{seed}")
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times
