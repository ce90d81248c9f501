"""`baton bench serve` without a server: workloads (deterministic, within their documented lengths,
ShareGPT parsing and its errors), arrivals, the metric math on hand-made records, the parsing of
streamed events, and the command line."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import subprocess
import sys

import numpy as np
import pytest

from baton import cli
from baton.bench import serve_report
from baton.bench import serve_workloads as wl
from baton.bench.serve import StreamTimer, request_body
from baton.bench.serve_config import ServeBenchConfig
from baton.bench.serve_report import (
    RequestRecord,
    format_table,
    meets_slos,
    percentile,
    summarize,
)

pytestmark = pytest.mark.unit


# ---- workloads ---------------------------------------------------------------------------------


def within(value: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= value <= bounds[1]


@pytest.mark.parametrize("workload", wl.WORKLOADS)
def test_a_seed_gives_the_same_workload(workload):
    first = wl.synthesize(workload, 40, seed=7)
    assert first == wl.synthesize(workload, 40, seed=7)
    assert first != wl.synthesize(workload, 40, seed=8)


def test_chat_lengths():
    requests = wl.synthesize("chat", 300, seed=1)
    for r in requests:
        assert r.kind == "chat" and r.system is None
        assert len(r.prompt.split()) == r.num_prompt_tokens
        assert within(r.num_prompt_tokens, wl.CHAT_PROMPT) and within(r.max_tokens, wl.CHAT_OUTPUT)
    # drawn across the whole range, not a corner of it
    prompt_lens = [r.num_prompt_tokens for r in requests]
    assert min(prompt_lens) < 100 and max(prompt_lens) > 450
    assert statistics.mean(prompt_lens) == pytest.approx(sum(wl.CHAT_PROMPT) / 2, rel=0.1)


def test_shared_prefix_uses_a_few_long_system_prompts():
    requests = wl.synthesize("shared-prefix", 100, seed=2)
    systems = {r.system for r in requests}
    assert len(systems) == wl.NUM_SHARED_PREFIXES
    assert all(len(s.split()) == wl.SHARED_PREFIX_LEN for s in systems)
    for r in requests:
        question = len(r.prompt.split())
        assert within(question, wl.SHARED_QUESTION)
        assert r.num_prompt_tokens == wl.SHARED_PREFIX_LEN + question
        assert within(r.max_tokens, wl.SHARED_OUTPUT)


def test_every_prefix_serves_as_many_requests_in_a_seeded_order():
    requests = wl.synthesize("shared-prefix", 64, seed=0, num_prefixes=8, prefix_tokens=1000)
    first_seen = list(dict.fromkeys(r.system for r in requests))
    assert len(first_seen) == 8 and {len(s.split()) for s in first_seen} == {1000}
    assert {sum(r.system == s for r in requests) for s in first_seen} == {8}
    assert all(r.num_prompt_tokens == 1000 + len(r.prompt.split()) for r in requests)
    # shuffled, not in runs of one prefix (that would change prefix 7 times)
    assert sum(a.system != b.system for a, b in itertools.pairwise(requests)) > 32
    other = wl.synthesize("shared-prefix", 64, seed=1, num_prefixes=8, prefix_tokens=1000)
    other_first_seen = list(dict.fromkeys(r.system for r in other))
    assert ([first_seen.index(r.system) for r in requests]
            != [other_first_seen.index(r.system) for r in other])  # another seed, another order


def test_balanced_order_gives_the_remainder_to_the_first_groups():
    import random

    order = wl.balanced_order(10, 4, random.Random(0))
    assert [order.count(g) for g in range(4)] == [3, 3, 2, 2]
    assert order != sorted(order)
    assert wl.balanced_order(2, 4, random.Random(0)) in ([0, 1], [1, 0])
    assert wl.balanced_order(0, 3, random.Random(0)) == []
    with pytest.raises(ValueError, match="num_prefixes must be > 0, got 0"):
        wl.synthesize("shared-prefix", 4, seed=0, num_prefixes=0)


def test_long_prompts_arrive_among_long_decodes():
    requests = wl.synthesize("long-prompt", 12, seed=3)
    assert [r.kind for r in requests] == ["long-decode"] * 3 + ["long-prompt"] + \
        ["long-decode"] * 3 + ["long-prompt"] + ["long-decode"] * 3 + ["long-prompt"]
    for r in requests:
        prompt, output = ((wl.LONG_PROMPT, wl.LONG_PROMPT_OUTPUT) if r.kind == "long-prompt"
                          else (wl.LONG_DECODE_PROMPT, wl.LONG_DECODE_OUTPUT))
        assert within(r.num_prompt_tokens, prompt) and within(r.max_tokens, output)


def test_mixed_holds_every_kind_and_the_cap_applies():
    requests = wl.synthesize("mixed", 60, seed=4, max_output_tokens=20)
    assert {r.kind for r in requests} == {"chat", "shared-prefix", "long-prompt", "long-decode"}
    assert max(r.max_tokens for r in requests) == 20


def test_a_tokenizer_makes_prompt_lengths_exact(tmp_path):
    from engine.tokenizer import Tokenizer
    from tests.support.tiny_tokenizer import byte_level_dir

    tokenizer = Tokenizer.from_dir(byte_level_dir(tmp_path / "tok"))  # splits most words
    for r in wl.synthesize("chat", 20, seed=5, tokenizer=tokenizer):
        assert r.num_prompt_tokens == len(tokenizer.encode(r.prompt, add_special_tokens=False))
        assert within(r.num_prompt_tokens, (wl.CHAT_PROMPT[0] - 2, wl.CHAT_PROMPT[1]))


def test_unknown_workload():
    with pytest.raises(ValueError, match="workload must be one of chat, shared-prefix"):
        wl.synthesize("chatty", 1, seed=0)


def sharegpt_line(*turns: tuple[str, str]) -> str:
    return json.dumps({"conversations": [{"from": f, "value": v} for f, v in turns]})


def test_sharegpt(tmp_path):
    path = tmp_path / "sg.jsonl"
    path.write_text("\n".join([
        sharegpt_line(("human", "What is two plus two?"), ("gpt", "x" * 40), ("human", "and?")),
        sharegpt_line(("gpt", "a greeting first"), ("human", "Name a colour."), ("gpt", "y" * 8000)),
        sharegpt_line(("human", "no answer")),  # skipped: no gpt turn answers it
        "",
        sharegpt_line(("system", "be brief"), ("human", "Hi"), ("gpt", "Hello")),
    ]) + "\n")
    requests = wl.load_sharegpt(path, 3, seed=0, max_output_tokens=1000)
    assert requests == wl.load_sharegpt(path, 3, seed=0, max_output_tokens=1000)
    by_prompt = {r.prompt: r for r in requests}
    assert set(by_prompt) == {"What is two plus two?", "Name a colour.", "Hi"}
    assert by_prompt["What is two plus two?"].max_tokens == 10  # 40 characters
    assert by_prompt["Name a colour."].max_tokens == 1000  # 2000, capped
    assert by_prompt["Hi"].max_tokens == 1 and by_prompt["Hi"].num_prompt_tokens == 1
    assert {r.kind for r in requests} == {"sharegpt"}
    # the seed picks and orders them
    orders = {tuple(r.prompt for r in wl.load_sharegpt(path, 3, seed=s)) for s in range(10)}
    assert len(orders) > 1
    # a JSON list (ShareGPT's own files) reads the same
    listed = tmp_path / "sg.json"
    listed.write_text(json.dumps([json.loads(line) for line in path.read_text().splitlines() if line]))
    assert wl.load_sharegpt(listed, 3, seed=0, max_output_tokens=1000) == requests
    with pytest.raises(ValueError, match="3 usable conversations .* fewer than num_requests=4"):
        wl.load_sharegpt(path, 4, seed=0)


@pytest.mark.parametrize("content, message", [
    ('{"conversations": []}\n{not json\n', r"sg.jsonl:2: not a JSON line"),
    ('{"turns": []}\n', r"line 1 is not a ShareGPT record"),
    ('[{"conversations": "hi"}]', r"entry 1 is not a ShareGPT record"),
    ('[{"conversations": []},', r"not valid JSON"),
    ('{"conversations": [{"from": "human"}]}\n', r"record 1 has a turn that is not"),
])
def test_malformed_sharegpt_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "sg.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        wl.load_sharegpt(path, 1, seed=0)


def test_arrivals():
    assert wl.arrival_times(5, math.inf, seed=0) == [0.0] * 5
    times = wl.arrival_times(4000, 50.0, seed=1)
    assert times == wl.arrival_times(4000, 50.0, seed=1) != wl.arrival_times(4000, 50.0, seed=2)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.1)  # exponential: std = mean
    with pytest.raises(ValueError, match="request_rate must be > 0"):
        wl.arrival_times(1, 0.0, seed=0)


# ---- metrics -----------------------------------------------------------------------------------


def test_percentile_matches_numpy():
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([1.0, 2.0], 50) == 1.5 and percentile([4.0], 99) == 4.0
    assert percentile([], 50) is None
    assert serve_report.statistics([]) == {"mean": None, "median": None, "p90": None, "p99": None}
    assert serve_report.statistics([10.0, 20.0, 30.0, 40.0]) == {"mean": 25.0, "median": 25.0,
                                                   "p90": pytest.approx(37.0),
                                                   "p99": pytest.approx(39.7)}


def records() -> list[RequestRecord]:
    return [
        RequestRecord(0, "chat", 5, prompt_tokens=10, output_tokens=5, ttft_ms=100.0,
                      itl_ms=[50.0, 50.0, 60.0, 40.0], latency_ms=300.0),  # tpot 50
        RequestRecord(1, "chat", 3, prompt_tokens=20, output_tokens=3, ttft_ms=400.0,
                      itl_ms=[10.0, 30.0], latency_ms=440.0),  # tpot 20
        RequestRecord(2, "chat", 1, prompt_tokens=30, output_tokens=1, ttft_ms=200.0,
                      latency_ms=200.0),  # no tpot
        RequestRecord(3, "chat", 9, prompt_tokens=40, output_tokens=2, ttft_ms=5.0,
                      itl_ms=[1.0], latency_ms=6.0, error="HTTP 500: boom"),
        RequestRecord(4, "chat", 9, prompt_tokens=50, error="ReadTimeout: late"),
    ]


def test_summary_of_hand_made_records():
    s = summarize(records(), duration_s=2.0, slos_ms={"ttft": 250.0, "tpot": 45.0})
    assert (s["num_completed"], s["num_failed"]) == (3, 2)
    assert s["first_error"] == "HTTP 500: boom"
    assert (s["total_prompt_tokens"], s["total_output_tokens"]) == (60, 9)
    assert s["request_throughput"] == 1.5
    assert s["output_token_throughput"] == 4.5
    assert s["total_token_throughput"] == 34.5
    # request 0 misses tpot, 1 misses ttft, 2 (one token, no tpot) meets both
    assert s["goodput"] == 0.5
    assert s["ttft_ms"]["mean"] == pytest.approx(700 / 3) and s["ttft_ms"]["median"] == 200.0
    assert s["tpot_ms"]["mean"] == 35.0 and s["tpot_ms"]["median"] == 35.0
    assert s["itl_ms"]["mean"] == 40.0 and s["itl_ms"]["median"] == 45.0  # failed gaps left out
    assert s["e2e_ms"]["median"] == 300.0 and s["e2e_ms"]["p90"] == pytest.approx(412.0)
    assert summarize(records(), 2.0, {})["goodput"] is None


def test_slos_and_tpot():
    ok, slow, single, failed, _ = records()
    assert ok.tpot_ms == 50.0 and slow.tpot_ms == 20.0 and single.tpot_ms is None
    assert failed.tpot_ms is None
    assert meets_slos(ok, {"e2el": 300.0}) and not meets_slos(ok, {"e2el": 299.0})
    assert meets_slos(single, {"tpot": 1.0}) and not meets_slos(failed, {})
    with pytest.raises(ValueError, match="among ttft, tpot, e2el"):
        summarize(records(), 1.0, {"itl": 1.0})
    with pytest.raises(ValueError, match="duration_s must be > 0"):
        summarize(records(), 0.0, {})


def test_table():
    results = {**summarize(records(), 2.0, {"ttft": 250.0}), "base_url": "http://h:1",
               "endpoint": "chat", "model": "m", "workload": "chat", "seed": 0,
               "request_rate": None, "concurrency": None, "goodput_slos_ms": {"ttft": 250.0}}
    table = format_table(results)
    assert "failed requests                  2" in table
    assert "first error                      HTTP 500: boom" in table
    assert "goodput (req/s; ttft <= 250 ms)  1.00" in table and "all at once" in table
    ttft = next(line for line in table.splitlines() if line.startswith("TTFT"))
    assert ttft.split() == ["TTFT", "233.33", "200.00", "360.00", "396.00"]


# ---- streamed events ---------------------------------------------------------------------------


def timed(lines: list[tuple[float, str]], prompt_tokens: int = 7) -> RequestRecord:
    timer = StreamTimer(RequestRecord(0, "chat", 4, prompt_tokens), start=10.0)
    for now, line in lines:
        if timer.feed(line, now):
            break
    return timer.finish(11.0)


def chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None,
          text: bool = False) -> str:
    choice = ({"index": 0, "text": content or "", "finish_reason": finish} if text else
              {"index": 0, "delta": {} if content is None else {"content": content},
               "finish_reason": finish})
    return "data: " + json.dumps({"choices": [choice] if content or finish else [], "usage": usage})


def test_stream_timing_counts_content_chunks_only():
    role = 'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}'
    r = timed([(10.0, ": keep-alive"), (10.05, role),
               (10.2, chunk("Hel")), (10.25, ""), (10.3, chunk("lo")), (10.45, chunk("!")),
               (10.5, chunk(finish="length")),
               (10.5, chunk(usage={"prompt_tokens": 12, "completion_tokens": 4})),
               (10.6, "data: [DONE]")])
    assert r.ok and r.ttft_ms == pytest.approx(200.0)
    assert r.itl_ms == pytest.approx([100.0, 150.0])
    assert r.latency_ms == pytest.approx(1000.0)
    assert (r.output_tokens, r.prompt_tokens) == (4, 12)  # the usage, not the 3 chunks
    assert r.tpot_ms == pytest.approx(800 / 3)


def test_stream_without_usage_counts_chunks_and_completions_text():
    r = timed([(10.1, chunk("a", text=True)), (10.2, chunk("b", text=True)),
               (10.3, chunk(finish="stop", text=True)), (10.3, "data: [DONE]")])
    assert r.ok and (r.output_tokens, r.prompt_tokens) == (2, 7)
    assert r.ttft_ms == pytest.approx(100.0) and r.itl_ms == pytest.approx([100.0])


@pytest.mark.parametrize("lines, error", [
    ([chunk("a"), 'data: {"error": {"message": "worker lost", "type": "server_error"}}'],
     "error in the stream: worker lost"),
    ([chunk("a")], "the stream ended before a finish_reason or [DONE]"),
    ([chunk(finish="stop"), "data: [DONE]"], "the stream carried no content"),
    ([chunk("a"), "data: {oops"], "the stream sent a line that is not JSON: '{oops'"),
])
def test_stream_failures(lines, error):
    r = timed([(10.1 + i / 10, line) for i, line in enumerate(lines)])
    assert r.error == error and not r.ok


def test_request_bodies():
    request = wl.WorkloadRequest("shared-prefix", "Why?", 16, 30, system="You are terse.")
    chat = request_body(ServeBenchConfig(), "m", request)
    assert chat == {"model": "m", "max_tokens": 16, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": True,
                    "messages": [{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "Why?"}]}
    plain = request_body(ServeBenchConfig(endpoint="completions", ignore_eos=False), "m", request)
    assert plain["prompt"] == "You are terse.\n\nWhy?" and "ignore_eos" not in plain


# ---- command line ------------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help(capsys):
    code, out, _ = run_cli(capsys, "bench", "serve", "--help")
    assert code == 0
    for word in ("--base-url", "--workload", "--num-requests", "--request-rate", "--concurrency",
                 "--seed", "--goodput", "--model", "--api-key", "--endpoint", "--tokenizer",
                 "--max-output-tokens", "--num-prefixes", "--prefix-tokens", "--no-ignore-eos", "--timeout", "--out", "--no-progress",
                 "shared-prefix", "long-prompt", "mixed", "ShareGPT", "TTFT", "TPOT", "ITL",
                 "goodput", "BATON_API_KEY", "OPENAI_API_KEY"):
        assert word in out
    assert "serve" in run_cli(capsys, "bench", "--help")[1]


@pytest.mark.parametrize("argv, words", [
    (["--request-rate", "0"], ["--request-rate", "> 0"]),
    (["--request-rate", "fast"], ["--request-rate", "number or inf"]),
    (["--request-rate", "2", "--concurrency", "4"], ["not allowed with"]),
    (["--concurrency", "0"], ["--concurrency", "> 0"]),
    (["--goodput", "ttft:abc"], ["--goodput", "ttft, tpot, e2el", "'ttft:abc'"]),
    (["--goodput", "itl:5"], ["--goodput", "'itl:5'"]),
    (["--endpoint", "embeddings"], ["--endpoint", "invalid choice"]),
    (["--workload", "no/such/file.jsonl"], ["workload must be one of chat", "no/such/file.jsonl"]),
    (["--goodput", "ttft:1", "ttft:2"], ["names a metric twice"]),
    (["--timeout", "0"], ["--timeout", "> 0"]),
])
def test_argument_errors_are_clear(capsys, argv, words):
    code, _, err = run_cli(capsys, "bench", "serve", *argv)
    assert code == 2
    for word in words:
        assert word in err


def test_arguments_become_the_config(monkeypatch):
    configs = []
    monkeypatch.setitem(sys.modules, "baton.bench.serve", _StandIn(configs))
    monkeypatch.setenv("BATON_API_KEY", "")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert cli.main(["bench", "serve", "--workload", "mixed", "--num-requests", "5",
                     "--concurrency", "3", "--seed", "9", "--goodput", "ttft:200", "e2el:900",
                     "--endpoint", "completions", "--no-ignore-eos", "--num-prefixes", "8",
                     "--prefix-tokens", "1000"]) == 0
    assert cli.main(["bench", "serve", "--api-key", "s3cret", "--request-rate", "2.5"]) == 0
    first, second = configs
    assert (first.workload, first.num_requests, first.concurrency, first.seed) == ("mixed", 5, 3, 9)
    assert first.request_rate == math.inf and first.api_key == "from-env"
    assert first.goodput_slos_ms == (("ttft", 200.0), ("e2el", 900.0))
    assert (first.endpoint, first.ignore_eos, first.model) == ("completions", False, None)
    assert (first.num_prefixes, first.prefix_tokens) == (8, 1000)
    assert (second.num_prefixes, second.prefix_tokens) == (wl.NUM_SHARED_PREFIXES,
                                                           wl.SHARED_PREFIX_LEN)
    assert second.request_rate == 2.5 and second.concurrency is None
    assert second.api_key == "s3cret" and "s3cret" not in second.command
    assert second.command == "baton bench serve --api-key *** --request-rate 2.5"


class _StandIn:
    """Stands in for the client module: records the config each run gets."""

    def __init__(self, configs: list) -> None:
        self.run = configs.append


def test_help_stays_light():
    code = ("import sys\nfrom baton import cli\ntry:\n    cli.main(['bench', 'serve', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'ray', 'cluster', 'transformers', 'httpx', "
            "'baton.bench.serve') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
