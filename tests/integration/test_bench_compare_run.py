"""`baton bench compare` end to end, against scripted servers instead of real clusters.

The first test compares two servers already running (base_url entries): scripted OpenAI servers
(tests.support.fake_openai) whose first token comes after 100 ms and 200 ms, so the second's
TTFT ratio to the first is 2. They have no /cluster or /metrics, so the counters must come back
null with a warning, and the run must not fail for it.

The others start clusters through a stand-in for `baton serve`: a script that prints the banner
(naming a scripted server's URL) and waits, one that dies before its banner, one that ignores
SIGTERM. Every one of them must be gone when compare returns, also after a Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

import pytest

from baton import cli
from baton.bench import compare
from baton.bench.compare_config import load_compare_config
from cluster.config import config_from_dict
from tests.support.fake_openai import FakeOpenAIServer

pytestmark = pytest.mark.integration

WORKLOAD = {"workload": "chat", "num_requests": 4, "request_rates": [10.0, 20.0],
            "max_output_tokens": 4}


def write_config(path: Path, clusters: dict, **top) -> Path:
    path.write_text(json.dumps({"name": "cmp", "clusters": clusters, "workloads": [WORKLOAD],
                                **top}))  # JSON is YAML
    return path


def test_two_running_servers_compared(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="baton.bench.compare")
    with FakeOpenAIServer(ttft_ms=100, itl_ms=10) as fast, \
            FakeOpenAIServer(ttft_ms=200, itl_ms=10) as slow:
        path = write_config(tmp_path / "cmp.yaml", {"fast": {"base_url": fast.url},
                                                     "slow": {"base_url": slow.url}})
        code = cli.main(["bench", "compare", str(path), "--out-dir", str(tmp_path / "out")])
        num_bodies = len(fast.stats()["bodies"])
    assert code == 0
    assert num_bodies == 2 + 2 * 4  # the warm-up, then each rate's requests
    out = tmp_path / "out"
    for name in ("cmp.json", "cmp.md", "cmp.png", "cmp-chat-latency.png", "cmp-chat-cdf.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "cmp.json").read_text())
    assert [c["name"] for c in r["clusters"]] == ["fast", "slow"]
    assert [(run["cluster"], run["load_value"], run["seed"]) for run in r["runs"]] == [
        ("fast", 10.0, 0), ("fast", 20.0, 1), ("slow", 10.0, 0), ("slow", 20.0, 1)]
    for run in r["runs"]:
        results = run["results"]
        assert (results["num_completed"], results["num_failed"]) == (4, 0)
        assert len(results["requests"]) == 4 and results["request_rate"] == run["load_value"]
        assert run["server_metrics"]["prefix_cache"] is None
        assert run["server_metrics"]["routing_decisions"] is None
        assert any("/cluster answered HTTP 404" in w for w in run["server_metrics"]["warnings"])
    # the same prompts at the same rate on both servers
    prompts = {(run["cluster"], run["load_value"]): [rec["prompt_tokens"] for rec in
                                                     run["results"]["requests"]]
               for run in r["runs"]}
    assert prompts["fast", 10.0] == prompts["slow", 10.0] != prompts["fast", 20.0]
    ttft = {run["cluster"]: run["results"]["ttft_ms"]["median"] for run in r["runs"]
            if run["load_value"] == 10.0}
    assert ttft["slow"] / ttft["fast"] == pytest.approx(2.0, rel=0.15)
    md = (out / "cmp.md").read_text()
    assert "| slow | 10 | " in md and "a server already running at http://127.0.0.1:" in md
    assert "Each cluster ÷ fast at the same load" in md
    assert "no worker metrics: GET" in caplog.text  # warned once per cluster
    assert caplog.text.count("no worker metrics: GET " + r["clusters"][0]["base_url"]) == 1
    assert "cluster 2/2 slow: chat at rate 20 req/s: 4 requests" in caplog.text


FAKE_SERVE = textwrap.dedent("""\
    import os, signal, sys, time
    url, config, pid_dir = sys.argv[1:4]
    name = os.path.basename(config).removesuffix(".yaml")
    open(os.path.join(pid_dir, name), "w").write(str(os.getpid()))
    text = open(config).read()
    if "http_port: 0" not in text or "grpc_port: 0" not in text:
        sys.exit(f"no free ports asked for: {text}")
    if name == "dies":
        print("loading the model failed: out of memory", flush=True)
        sys.exit(3)
    if name == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("Baton is serving fake-model")
    print(f"  HTTP (OpenAI API)  {url}/v1")
    print("Press Ctrl-C to stop.", flush=True)
    while True:
        time.sleep(0.05)
""")


@pytest.fixture
def fake_serve(tmp_path, monkeypatch):
    """compare starts the stand-in instead of `baton serve`; yields (server, pid_dir)."""
    script, pid_dir = tmp_path / "fake_serve.py", tmp_path / "pids"
    script.write_text(FAKE_SERVE)
    pid_dir.mkdir()
    with FakeOpenAIServer(ttft_ms=50, itl_ms=10) as server:
        monkeypatch.setattr(compare, "serve_command", lambda config: [
            sys.executable, str(script), server.url, str(config), str(pid_dir)])
        yield server, pid_dir


def gone(pid_dir: Path, name: str) -> bool:
    pid = int((pid_dir / name).read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def started_config(tmp_path: Path, *names: str):
    path = write_config(tmp_path / "cmp.yaml", {n: {"prefill": {"count": 0}} for n in names},
                        warmup_requests=0)
    config = load_compare_config(path, config_from_dict, out_dir=tmp_path / "out")
    return dataclasses.replace(config, stop_timeout_s=1.0, startup_timeout_s=30.0)


def test_started_clusters_are_stopped_whatever_happens(tmp_path, fake_serve, caplog):
    caplog.set_level(logging.INFO, logger="baton.bench.compare")
    _, pid_dir = fake_serve
    config = started_config(tmp_path, "ok", "dies", "stubborn")
    with pytest.raises(RuntimeError, match="^cluster dies did not start$"):
        compare.run(config)
    assert all(gone(pid_dir, name) for name in ("ok", "dies", "stubborn"))
    r = json.loads((tmp_path / "out" / "cmp.json").read_text())
    ok, dies, stubborn = r["clusters"]
    assert stubborn["error"] is None
    assert ok["error"] is None and ok["startup_s"] > 0 and ok["base_url"].startswith("http://")
    assert "exited with code 3" in dies["error"] and "out of memory" in dies["error"]
    assert [(run["cluster"], run["results"]["num_completed"]) for run in r["runs"]] == [
        ("ok", 4), ("ok", 4), ("stubborn", 4), ("stubborn", 4)]
    assert "stubborn: still running 1 s after SIGTERM; killing its process group" in caplog.text
    assert "cluster 1/3 ok: stopped (exit code 0)" in caplog.text


def test_ctrl_c_stops_the_running_cluster(tmp_path, fake_serve, monkeypatch):
    _, pid_dir = fake_serve

    async def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "_measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare.run(started_config(tmp_path, "ok"))
    assert gone(pid_dir, "ok")
    assert not (tmp_path / "out").exists()  # nothing written
