"""`baton bench serve` against a scripted OpenAI-compatible server whose delays are known: the
measured TTFT, ITL and TPOT match the script, throughputs agree with the records, goodput counts
the class of requests that meets the SLO, and failures are counted, not dropped.

The script, in the prompts: "fast" ones wait 300 ms for the first token, "slow" ones 600 ms, then
40 ms between tokens; one gets HTTP 500 and one an error event mid-stream. The server runs in a
process of its own; its delays are long against event-loop jitter (a few ms), and medians absorb
a stall, so 5% holds on a busy machine. Requests arrive at a Poisson rate: a burst of new
connections would add the client's own cost of opening them (a few ms each) to their TTFT.
"""

from __future__ import annotations

import json
import statistics

import pytest

from baton import cli
from baton.bench import serve
from baton.bench.serve_config import ServeBenchConfig
from baton.bench.serve_workloads import arrival_times
from tests.support.fake_openai import MODEL, FakeOpenAIServer

pytestmark = pytest.mark.integration

TTFT_FAST_MS, TTFT_SLOW_MS, ITL_MS, NUM_TOKENS = 300.0, 600.0, 40.0, 8
SLO_MS = 450.0  # on TTFT: the fast requests meet it, the slow ones miss it
CLASSES = {  # the script of each class of prompts (tests.support.fake_openai), and how many
    f"ttft={TTFT_FAST_MS:g} fast": 4, f"ttft={TTFT_SLOW_MS:g} slow": 4, "status=500": 1, "broken=2": 1,
}


def prompts(extra: str = "") -> list[str]:
    return [f"{script} {extra}question {i}" for script, n in CLASSES.items() for i in range(n)]


def write_sharegpt(path, extra: str = ""):
    """One conversation per request; each answer is 32 characters, so max_tokens = 8."""
    lines = [json.dumps({"conversations": [{"from": "human", "value": prompt},
                                           {"from": "gpt", "value": "x" * (4 * NUM_TOKENS)}]})
             for prompt in prompts(extra)]
    path.write_text("\n".join(lines) + "\n")
    return path


def near(value: float, expected: float, rel: float = 0.05) -> bool:
    return abs(value - expected) <= rel * expected


def check_results(r: dict) -> None:
    """What every run of the scripted file must show."""
    num_ok, num_fast = 8, 4
    assert (r["num_completed"], r["num_failed"]) == (num_ok, 2)
    records = r["requests"]
    assert len(records) == sum(CLASSES.values())
    errors = sorted(rec["error"] for rec in records if rec["error"])
    assert errors[0] == "HTTP 500: scripted failure 500"
    assert errors[1] == "error in the stream: scripted error in the stream"
    assert r["first_error"] in errors

    ok = [rec for rec in records if rec["error"] is None]
    fast = [rec for rec in ok if rec["ttft_ms"] < (TTFT_FAST_MS + TTFT_SLOW_MS) / 2]
    slow = [rec for rec in ok if rec["ttft_ms"] >= (TTFT_FAST_MS + TTFT_SLOW_MS) / 2]
    assert len(fast) == num_fast
    assert near(statistics.median(rec["ttft_ms"] for rec in fast), TTFT_FAST_MS)
    assert near(statistics.median(rec["ttft_ms"] for rec in slow), TTFT_SLOW_MS)
    decode_ms = (NUM_TOKENS - 1) * ITL_MS
    assert near(statistics.median(rec["latency_ms"] for rec in fast), TTFT_FAST_MS + decode_ms)
    assert near(statistics.median(rec["latency_ms"] for rec in slow), TTFT_SLOW_MS + decode_ms)
    assert all(rec["output_tokens"] == NUM_TOKENS and len(rec["itl_ms"]) == NUM_TOKENS - 1
               for rec in ok)
    assert near(r["itl_ms"]["median"], ITL_MS)
    assert near(r["tpot_ms"]["median"], ITL_MS)
    assert near(r["ttft_ms"]["median"], (TTFT_FAST_MS + TTFT_SLOW_MS) / 2)

    duration = r["duration_s"]
    assert duration * 1e3 >= TTFT_SLOW_MS + decode_ms
    assert r["total_output_tokens"] == num_ok * NUM_TOKENS
    assert r["total_prompt_tokens"] == sum(rec["prompt_tokens"] for rec in ok) > 0
    assert r["request_throughput"] == pytest.approx(num_ok / duration)
    assert r["output_token_throughput"] == pytest.approx(num_ok * NUM_TOKENS / duration)
    assert r["total_token_throughput"] == pytest.approx(
        (r["total_prompt_tokens"] + r["total_output_tokens"]) / duration)
    # the fast half of the successful requests meets the SLO
    assert r["goodput"] == pytest.approx(r["request_throughput"] / 2)


def test_measures_the_scripted_delays_in_process(tmp_path, capsys):
    path = write_sharegpt(tmp_path / "conversations.jsonl")
    with FakeOpenAIServer() as server:
        config = ServeBenchConfig(base_url=server.url, workload=str(path),
                                  num_requests=sum(CLASSES.values()), request_rate=20.0,
                                  goodput_slos_ms=(("ttft", SLO_MS),), progress=False)
        r = serve.run(config)
        bodies = server.stats()["bodies"]
    check_results(r)
    assert r["model"] == MODEL  # asked GET /v1/models
    assert len(bodies) == sum(CLASSES.values())
    for body in bodies:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["ignore_eos"] is True and body["max_tokens"] == NUM_TOKENS
        assert body["model"] == MODEL and body["messages"][-1]["role"] == "user"
    # prompt tokens from the server's usage: the fake counts words
    assert all(rec["prompt_tokens"] == 4 for rec in r["requests"] if rec["error"] is None)
    out = capsys.readouterr().out
    assert "failed requests" in out and f"goodput (req/s; ttft <= {SLO_MS:g} ms)" in out
    assert "TTFT" in out and "TPOT" in out and "ITL" in out and "E2E" in out


def test_cli_with_poisson_arrivals_and_no_usage_writes_json(tmp_path, capsys):
    path = write_sharegpt(tmp_path / "conversations.jsonl", extra="nousage ")
    out_path = tmp_path / "results.json"
    rate, seed = 10.0, 3
    with FakeOpenAIServer() as server:
        code = cli.main(["bench", "serve", "--base-url", server.url, "--workload", str(path),
                         "--num-requests", str(sum(CLASSES.values())), "--request-rate",
                         str(rate), "--seed", str(seed), "--goodput", f"ttft:{SLO_MS:g}",
                         "--endpoint", "completions", "--model", "named-model", "--out",
                         str(out_path)])
        bodies = server.stats()["bodies"]
    assert code == 0
    r = json.loads(out_path.read_text())
    check_results(r)  # output tokens counted from the chunks: no usage came
    assert r["model"] == "named-model" and r["endpoint"] == "completions"
    assert (r["request_rate"], r["seed"], r["goodput_slos_ms"]) == (rate, seed, {"ttft": SLO_MS})
    assert r["command"].startswith("baton bench serve --base-url")
    assert all("prompt" in body and "messages" not in body for body in bodies)
    # without usage, the workload's own count: 4 characters a token
    assert (sorted(rec["prompt_tokens"] for rec in r["requests"])
            == sorted(round(len(prompt) / 4) for prompt in prompts("nousage ")))
    # sent at the Poisson arrivals: never early, and soon after
    arrivals_ms = [t * 1e3 for t in arrival_times(len(r["requests"]), rate, seed)]
    for rec, at in zip(r["requests"], arrivals_ms):
        assert at <= rec["start_ms"] <= at + 250
    assert "failed requests" in capsys.readouterr().out


def test_closed_loop_keeps_concurrency_in_flight(capsys):
    with FakeOpenAIServer(ttft_ms=100, itl_ms=20) as server:
        config = ServeBenchConfig(base_url=server.url, workload="chat", num_requests=6,
                                  concurrency=2, max_output_tokens=4, progress=False)
        r = serve.run(config)
        assert server.stats()["max_in_flight"] == 2
    assert (r["num_completed"], r["num_failed"], r["concurrency"]) == (6, 0, 2)
    assert all(rec["output_tokens"] == 4 for rec in r["requests"])
    # the third request starts once one of the first two is done
    starts = sorted(rec["start_ms"] for rec in r["requests"])
    assert starts[2] >= 100 + 3 * 20


def test_every_request_failing_is_exit_code_1(tmp_path, capsys, caplog):
    path = tmp_path / "failing.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "status=503 hi"},
                                                  {"from": "gpt", "value": "hello"}]}) + "\n")
    with FakeOpenAIServer() as server:
        code = cli.main(["bench", "serve", "--base-url", server.url, "--workload", str(path),
                         "--num-requests", "1", "--no-progress"])
    assert code == 1
    assert "all 1 requests failed; the first error: HTTP 503: scripted failure 503" in caplog.text
    assert "failed requests" in capsys.readouterr().out


def test_unreachable_server_is_a_clear_error(caplog):
    from cluster.redis_server import free_port

    code = cli.main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}",
                     "--num-requests", "2", "--no-progress"])
    assert code == 1
    assert "cannot reach the server" in caplog.text and "--base-url" in caplog.text


@pytest.mark.slow
def test_a_prompt_of_n_words_is_n_smollm2_tokens(smollm2_dir):
    """The documented rough length is exact for the default model."""
    from baton.bench.serve_workloads import WORDS, synthesize
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(smollm2_dir)
    assert [w for w in WORDS if len(tokenizer.encode(w, add_special_tokens=False)) != 1
            or len(tokenizer.encode(" " + w, add_special_tokens=False)) != 1] == []
    for r in synthesize("mixed", 20, seed=0):
        text = f"{r.system} {r.prompt}" if r.system else r.prompt
        assert len(tokenizer.encode(text, add_special_tokens=False)) == r.num_prompt_tokens
