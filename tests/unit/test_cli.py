"""The `baton` command line: help on every command, clear argument errors, light imports, and
serve's flags turning into config overrides."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from baton import cli

pytestmark = pytest.mark.unit


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, words", [
    ([], ["serve", "status", "chat", "bench"]),
    (["serve"], ["--config", "--model", "--prefill-workers", "--decode-workers", "--host",
                 "--http-port", "--grpc-port", "--redis-url", "--ray-address", "colocated"]),
    (["status"], ["--url", "--json", "/cluster"]),
    (["chat"], ["message", "--grpc-address", "--url", "--temperature", "--max-tokens", "--system"]),
    (["bench"], ["engine", "roofline"]),
    (["bench", "engine"], ["--model", "--only", "--quick", "--tokens", "--repeats", "--threads",
                           "--out-dir", "decode", "batch", "prefill", "prefix", "memory floor",
                           "GEMM roofline", "docs/benchmarks"]),
])
def test_help(capsys, argv, words):
    code, out, _ = run_cli(capsys, *argv, "--help")
    assert code == 0
    for word in words:
        assert word in out


@pytest.fixture
def bench_runs(monkeypatch):
    """Stands in for the measuring module: records the config each `baton bench engine` gets."""
    configs = []
    monkeypatch.setitem(sys.modules, "baton.bench.engine",
                        types.SimpleNamespace(run=configs.append))
    return configs


def test_bench_engine_arguments_become_its_config(bench_runs):
    assert cli.main(["bench", "engine", "--only", "decode,prefill", "--quick", "--tokens", "8",
                     "--threads", "2"]) == 0
    (config,) = bench_runs
    assert config.parts == ("decode", "prefill")
    assert (config.num_new_tokens, config.num_repeats, config.num_threads) == (8, 1, 2)
    assert config.concurrency == (1, 8) and config.prefill_lens == (128,)
    assert config.out_dir is None  # a partial run writes only where --out-dir says
    assert config.command == "baton bench engine --only decode,prefill --quick --tokens 8 --threads 2"


def test_bench_engine_full_run_writes_to_docs(bench_runs, tmp_path):
    assert cli.main(["bench", "engine"]) == 0
    assert cli.main(["bench", "engine", "--quick", "--out-dir", str(tmp_path)]) == 0
    full, quick = bench_runs
    assert full.parts == ("decode", "batch", "prefill", "prefix")
    assert (full.num_new_tokens, full.num_repeats) == (64, 3)
    assert full.concurrency == (1, 8, 32, 64) and full.prefill_lens == (128, 512, 2048)
    assert full.out_dir == Path("docs") / "benchmarks"
    assert quick.out_dir == tmp_path


def test_bench_engine_failure_is_exit_code_1(monkeypatch, caplog):
    def fail(config):
        raise ValueError("unknown model 'nope'")

    monkeypatch.setitem(sys.modules, "baton.bench.engine", types.SimpleNamespace(run=fail))
    assert cli.main(["bench", "engine", "--model", "nope"]) == 1
    assert "unknown model 'nope'" in caplog.text


def test_no_command(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2
    assert "COMMAND" in err


@pytest.mark.parametrize("argv, words", [
    (["serve", "--prefill-workers", "x"], ["--prefill-workers", "whole number", "'x'"]),
    (["serve", "--decode-workers", "-1"], ["--decode-workers", ">= 0"]),
    (["serve", "--http-port", "70000"], ["--http-port", "65535"]),
    (["serve", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["chat", "hi", "--temperature", "-1"], ["--temperature", ">= 0"]),
    (["chat", "hi", "--max-tokens", "0"], ["--max-tokens", "> 0"]),
    (["chat", "hi", "--url", "http://x", "--grpc-address", "x:1"], ["not allowed with"]),
    (["chat"], ["message"]),
    (["bench"], ["BENCHMARK"]),
    (["bench", "engine", "--only", "decode,bogus"], ["--only", "decode, batch, prefill, prefix",
                                                     "'decode,bogus'"]),
    (["bench", "engine", "--tokens", "0"], ["--tokens", "> 0"]),
    (["bench", "engine", "--repeats", "x"], ["--repeats", "whole number"]),
])
def test_argument_errors_are_clear(capsys, argv, words):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    for word in words:
        assert word in err


def test_serve_reports_config_errors_without_starting_anything(capsys, tmp_path):
    path = tmp_path / "baton.yaml"
    path.write_text("prefill: {cuont: 1}\n")
    code, _, err = run_cli(capsys, "serve", "--config", str(path))
    assert code == 2
    assert "'prefill.cuont'" in err


def test_serve_flags_override_the_file(monkeypatch, tmp_path):
    path = tmp_path / "baton.yaml"
    path.write_text("model: file-model\nprefill: {count: 3}\nrouter: {grpc_port: 7001}\n")
    seen = {}

    import cluster.launcher

    monkeypatch.setattr(cluster.launcher, "serve", lambda config: seen.setdefault("config", config) and 0)
    code = cli.main(["serve", "--config", str(path), "--prefill-workers", "0", "--decode-workers",
                     "2", "--host", "0.0.0.0", "--http-port", "0", "--redis-url",
                     "redis://127.0.0.1:1/0", "--ray-address", "auto"])
    assert code == 0
    cfg = seen["config"]
    assert cfg.model == "file-model"
    assert (cfg.prefill.count, cfg.decode.count) == (0, 2)
    assert (cfg.router.host, cfg.router.http_port, cfg.router.grpc_port) == ("0.0.0.0", 0, 7001)
    assert (cfg.redis_url, cfg.ray_address) == ("redis://127.0.0.1:1/0", "auto")


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from baton import cli\n"
        "for argv in (['serve', '--help'], ['bench', 'engine', '--help']):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'ray', 'cluster', 'transformers') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---- status against a stand-in router -----------------------------------------------------------

CLUSTER = {"workers": [
    {"id": "decode-0-ab12", "role": "decode", "state": "ready", "grpc_address": "127.0.0.1:4001",
     "metrics_url": "http://127.0.0.1:4002/metrics", "pid": 111, "running": 3, "waiting": 1,
     "kv_usage": 0.25},
    {"worker_id": "prefill-0-ab12", "role": "prefill", "state": "draining",
     "grpc_address": "127.0.0.1:4003", "pid": 222, "num_running": 0, "num_waiting": 0,
     "kv_usage": 0.0},
]}


@pytest.fixture
def fake_router():
    """A stand-in router answering GET /cluster with CLUSTER; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(CLUSTER).encode() if self.path == "/cluster" else b"{}"
            self.send_response(200 if self.path == "/cluster" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_status_table(capsys, fake_router):
    code, out, _ = run_cli(capsys, "status", "--url", fake_router)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["ID", "ROLE", "STATE", "ADDRESS", "PID", "RUNNING", "WAITING",
                                "KV", "USAGE"]
    assert lines[1].split() == ["decode-0-ab12", "decode", "ready", "127.0.0.1:4001", "111", "3",
                                "1", "25.0%"]
    assert lines[2].split() == ["prefill-0-ab12", "prefill", "draining", "127.0.0.1:4003", "222",
                                "0", "0", "0.0%"]


def test_status_json(capsys, fake_router):
    code, out, _ = run_cli(capsys, "status", "--url", fake_router + "/", "--json")
    assert code == 0
    assert json.loads(out) == CLUSTER


def test_status_of_an_empty_cluster():
    assert cli.format_status({"workers": []}) == "no workers registered"
    assert cli.format_status([]) == "no workers registered"


def test_status_when_nothing_listens(capsys):
    from cluster.redis_server import free_port

    code, _, err = run_cli(capsys, "status", "--url", f"http://127.0.0.1:{free_port()}",
                           "--timeout", "2")
    assert code == 1
    assert "cannot reach the router" in err and "--url" in err


def test_chat_when_nothing_listens(capsys):
    from cluster.redis_server import free_port

    code, _, err = run_cli(capsys, "chat", "hi", "--grpc-address", f"127.0.0.1:{free_port()}",
                           "--timeout", "3")
    assert code == 1
    assert "baton serve" in err and "--grpc-address" in err
