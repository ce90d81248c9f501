"""Real worker processes for fault tests: `python -m prefill_worker` / `python -m decode_worker`.

spawn_worker() starts one (stdout and stderr go to files under log_dir, so a chatty worker never
blocks on a full pipe); WorkerProcess.wait_ready() reads its `READY grpc=... metrics=...` line.
WorkerProcesses is the owner tests use (a context manager, so a yield fixture is its finalizer):
ensure() hands out running workers by id (starting again one a test killed), everything it spawned
is terminated (SIGTERM, then SIGKILL) when it closes, and an atexit hook kills whatever a crashed
test run left, so no worker outlives the test process.

A WorkerProcess reads its worker's state the way an operator would: free KV blocks through the
GetLoad RPC, counters from its Prometheus endpoint.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from prometheus_client.parser import text_string_to_metric_families

from baton.v1 import worker_pb2, worker_pb2_grpc
from baton.wire import GRPC_OPTIONS

if TYPE_CHECKING:
    from typing import Self

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny"  # the model label on the workers' metrics

_live: set[subprocess.Popen] = set()  # every worker spawned here and not yet reaped


def _kill_leftovers() -> None:
    for proc in list(_live):
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


atexit.register(_kill_leftovers)


class WorkerStartError(RuntimeError):
    pass


@dataclass
class WorkerProcess:
    role: str  # "prefill" | "decode"
    worker_id: str
    proc: subprocess.Popen
    log_path: Path
    grpc_address: str = ""
    metrics_url: str = ""
    _channel: grpc.Channel | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> WorkerProcess:
        """Wait for the READY line; raises WorkerStartError (with the log's tail) otherwise."""
        out_path = self.log_path.with_suffix(".out")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in out_path.read_text().splitlines():
                if line.startswith("READY "):
                    fields = dict(part.split("=", 1) for part in line.split()[1:])
                    self.grpc_address, self.metrics_url = fields["grpc"], fields["metrics"]
                    return self
            if self.proc.poll() is not None:
                raise WorkerStartError(f"{self.worker_id} exited with {self.proc.returncode} "
                                       f"before READY:\n{self.log_tail()}")
            time.sleep(0.05)
        raise WorkerStartError(f"{self.worker_id} not READY within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, num_lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-num_lines:])
        except OSError:
            return "(no log)"

    # -- reading its state ------------------------------------------------------------------

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.grpc_address, options=GRPC_OPTIONS)
        return self._channel

    def load(self, timeout: float = 5.0) -> worker_pb2.Load:
        stub = (worker_pb2_grpc.PrefillStub(self.channel()) if self.role == "prefill"
                else worker_pb2_grpc.DecodeStub(self.channel()))
        return stub.GetLoad(worker_pb2.LoadRequest(), timeout=timeout)

    def num_free_blocks(self) -> int:
        return self.load().num_free_blocks

    def metric(self, name: str, **labels: str) -> float:
        """The sample `name` with this worker's labels (plus `labels`); 0.0 when absent."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as reply:
            text = reply.read().decode()
        want = {"model": MODEL_NAME, "role": self.role, "worker": self.worker_id, **labels}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == want:
                    return sample.value
        return 0.0

    def info(self):
        """The router's registry entry for this worker."""
        from router.registry import WorkerInfo

        return WorkerInfo(worker_id=self.worker_id, role=self.role, state="ready",
                          grpc_address=self.grpc_address, metrics_url=self.metrics_url,
                          pid=self.pid, node="local")

    # -- ending it --------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL, no grace (a crash), and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close()

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful stop); SIGKILL if it is still there after timeout. The exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        _live.discard(self.proc)
        if self._channel is not None:
            self._channel.close()
            self._channel = None


def spawn_worker(role: str, model_dir: Path, log_dir: Path, *, worker_id: str,
                 kv_cache_memory_bytes: int = 16 << 20, threads: int = 1,
                 kv_lease_s: float | None = None, kv_chunk_bytes: int | None = None,
                 kv_ring_slot_bytes: int | None = None, kv_shared_memory: bool = True,
                 max_num_batched_tokens: int | None = None, grace_s: float = 1.0) -> WorkerProcess:
    """Start a worker process (not yet ready: call wait_ready)."""
    if role not in ("prefill", "decode"):
        raise ValueError(f"role must be prefill or decode, got {role!r}")
    args = [sys.executable, "-m", f"{role}_worker", "--model", str(model_dir),
            "--model-name", MODEL_NAME, "--worker-id", worker_id,
            "--kv-cache-memory-bytes", str(kv_cache_memory_bytes), "--threads", str(threads),
            "--device", "cpu", "--dtype", "float32", "--grace-s", str(grace_s)]
    if kv_lease_s is not None:
        args += ["--kv-lease-s", str(kv_lease_s)]
    if kv_chunk_bytes is not None:
        args += ["--kv-chunk-bytes", str(kv_chunk_bytes)]
    if kv_ring_slot_bytes is not None:
        args += ["--kv-ring-slot-bytes", str(kv_ring_slot_bytes)]
    if not kv_shared_memory:
        args += ["--no-kv-shared-memory"]
    if max_num_batched_tokens is not None:
        args += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    log_path = log_dir / f"{worker_id}.log"
    for n in range(1, 1000):  # a worker started again under the same id keeps the old log
        if not log_path.exists():
            break
        log_path = log_dir / f"{worker_id}.{n}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    with open(log_path.with_suffix(".out"), "wb") as out, open(log_path, "wb") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env)
    _live.add(proc)
    return WorkerProcess(role, worker_id, proc, log_path)


class WorkerProcesses:
    """Spawns workers into log_dir and ends every one of them on close (or at exit)."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []

    def spawn(self, role: str, worker_id: str, **options) -> WorkerProcess:
        worker = spawn_worker(role, self.model_dir, self.log_dir, worker_id=worker_id, **options)
        self.workers.append(worker)
        return worker

    def ensure(self, *specs: tuple[str, str, dict], timeout: float = 60.0) -> list[WorkerProcess]:
        """The running worker for each (role, worker_id, options): one spawned earlier and still
        alive, else a new one. New ones start at once, then all are waited for (READY)."""
        alive = {w.worker_id: w for w in self.workers if w.proc.poll() is None}
        workers = [alive.get(worker_id) or self.spawn(role, worker_id, **options)
                   for role, worker_id, options in specs]
        return [w if w.grpc_address else w.wait_ready(timeout) for w in workers]

    def close(self) -> None:
        for worker in self.workers:  # all stop at once: each gets its grace in parallel
            if worker.proc.poll() is None:
                worker.proc.terminate()
        for worker in self.workers:
            worker.terminate()
        self.workers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
