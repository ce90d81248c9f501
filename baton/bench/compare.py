"""`baton bench compare`: serving configurations under the same load, one after another.

Lifecycle, for each cluster of the config in order:

  started  write its `baton serve` config to a temporary file -> run `python -m baton.cli serve
           --config FILE` in a session of its own -> wait for the banner's last line and read
           the router's URL from it -> GET /cluster for the workers -> warm-up requests -> every
           workload at every load: snapshot the counters (baton.bench.compare_metrics), run the
           benchmark (baton.bench.serve), snapshot again -> SIGTERM, wait, and kill the process
           group if it outlives stop_timeout_s
  external (base_url) the same against a server already running, which is neither started nor
           stopped

A started cluster is stopped on every way out: done, an error, Ctrl-C, or SIGTERM (turned into
KeyboardInterrupt while clusters run); a second Ctrl-C while one stops kills it at once. Only
one cluster runs at a time. A cluster that does not start, or a run that raises, is recorded
with its error and the comparison goes on; once the results are written (report:
baton.bench.compare_report), RuntimeError makes the exit code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import httpx

from baton.bench import serve
from baton.bench.compare_config import ClusterSpec, CompareConfig, WorkloadSpec
from baton.bench.compare_metrics import run_deltas, snapshot
from baton.bench.compare_report import render_markdown, render_plots
from baton.bench.report import emit
from baton.bench.serve_config import ServeBenchConfig

logger = logging.getLogger(__name__)

BANNER_END = "Press Ctrl-C to stop."  # the last line of `baton serve`'s banner
HTTP_LINE = re.compile(r"HTTP \(OpenAI API\)\s+(https?://\S+)/v1\b")
TAIL_LINES = 60  # of a cluster's output, shown when it fails
WARMUP_SEED = 1_000_003  # far from the workloads' seeds: warm-up prompts share nothing with theirs


def serve_command(config_file: Path) -> list[str]:
    return [sys.executable, "-m", "baton.cli", "serve", "--config", str(config_file)]


class ServeProcess:
    """A `baton serve` in a session of its own; a thread reads its output (each line logged at
    DEBUG, the last TAIL_LINES kept for errors) and finds the router's URL in the banner."""

    def __init__(self, argv: list[str], name: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)  # a config's ray_address says where to run
        self.name = name
        self.base_url: str | None = None
        self.lines: deque[str] = deque(maxlen=TAIL_LINES)
        self._ready = threading.Event()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, name=f"serve-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            logger.debug("[%s] %s", self.name, line)
            match = HTTP_LINE.search(line)
            if match and self.base_url is None:
                self.base_url = match.group(1)
            if line.strip() == BANNER_END:
                self._ready.set()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output_tail(self) -> str:
        return "\n".join(self.lines) or "(no output)"

    def wait_ready(self, timeout_s: float) -> str:
        """The router's base URL once the banner is out; RuntimeError with the output's tail if
        the process exits or timeout_s passes first."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.2):
            if not self.alive:
                self._reader.join(5)
                raise RuntimeError(f"baton serve exited with code {self.proc.returncode} before "
                                   f"it was ready; its last output:\n{self.output_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"baton serve was not ready within {timeout_s:g} s "
                                   f"(startup_timeout_s); its last output:\n{self.output_tail()}")
        if self.base_url is None:
            raise RuntimeError("the banner of baton serve names no HTTP URL:\n"
                               + self.output_tail())
        return self.base_url

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, then SIGKILL to the whole session after timeout_s (or a second Ctrl-C)."""
        try:
            if self.alive:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("%s: still running %g s after SIGTERM; killing its process "
                                   "group", self.name, timeout_s)
                    self._kill_group()
        except KeyboardInterrupt:
            logger.warning("%s: interrupted while stopping; killing its process group", self.name)
            self._kill_group()
            raise
        finally:
            self._reader.join(5)

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pgid == pid
        self.proc.wait(10)


@contextlib.contextmanager
def _sigterm_interrupts():
    """While clusters run, SIGTERM unwinds like Ctrl-C, so the running cluster gets stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _worker_roles(base_url: str, api_key: str | None) -> dict[str, int] | None:
    """{role: number of workers} from GET /cluster; None if the server does not say."""
    try:
        workers = httpx.get(f"{base_url}/cluster", headers=_headers(api_key), timeout=10).json()
        roles = [w["role"] for w in workers["workers"]]
    except (httpx.HTTPError, ValueError, LookupError, TypeError):
        return None
    return {role: roles.count(role) for role in sorted(set(roles))}


async def _measure(bench: ServeBenchConfig, api_key: str | None) -> tuple[dict, dict]:
    async with httpx.AsyncClient(headers=_headers(api_key)) as client:
        before = await snapshot(client, bench.base_url)
        results = await serve.benchmark(bench)
        after = await snapshot(client, bench.base_url)
    return results, run_deltas(before, after)


def _load_text(workload: WorkloadSpec, index: int) -> str:
    value = workload.values[index]
    return (f"rate {value:g} req/s" if workload.load == "request_rate"
            else f"concurrency {int(value)}")


class _ClusterRun:
    """One cluster's part of the comparison; results go into entry and runs."""

    def __init__(self, config: CompareConfig, index: int, spec: ClusterSpec, runs: list) -> None:
        self.config, self.spec, self.runs = config, spec, runs
        self.where = f"cluster {index + 1}/{len(config.clusters)} {spec.name}"
        self.entry = {"name": spec.name, "started": spec.started, "base_url": spec.base_url,
                      "serve_config": spec.serve_config, "startup_s": None, "workers": None,
                      "error": None}
        self.warned: set[str] = set()

    def run(self) -> dict:
        with contextlib.ExitStack() as stack:
            process = None
            if self.spec.started:
                process = self._start(stack)
                if process is None:
                    return self.entry
            base_url = self.entry["base_url"]
            self.entry["workers"] = _worker_roles(base_url, self.config.api_key)
            self._warm_up(base_url)
            for workload in self.config.workloads:
                for k in range(len(workload.values)):
                    self.runs.append(self._run_one(workload, k, base_url, process))
        return self.entry

    def _start(self, stack: contextlib.ExitStack) -> ServeProcess | None:
        import yaml

        logger.info("%s: starting", self.where)
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="baton-compare-")))
        path = folder / f"{self.spec.name}.yaml"
        path.write_text(yaml.safe_dump(self.spec.serve_config, sort_keys=False))
        start = time.perf_counter()
        process = ServeProcess(serve_command(path), self.spec.name)
        stack.callback(self._stop, process)
        try:
            self.entry["base_url"] = process.wait_ready(self.config.startup_timeout_s)
        except RuntimeError as exc:
            logger.error("%s: %s", self.where, exc)
            self.entry["error"] = str(exc)
            return None
        self.entry["startup_s"] = time.perf_counter() - start
        logger.info("%s: serving at %s, ready after %.0f s", self.where, self.entry["base_url"],
                    self.entry["startup_s"])
        return process

    def _stop(self, process: ServeProcess) -> None:
        logger.info("%s: stopping", self.where)
        process.stop(self.config.stop_timeout_s)
        logger.info("%s: stopped (exit code %s)", self.where, process.proc.returncode)

    def _warm_up(self, base_url: str) -> None:
        n = self.config.warmup_requests
        if not n:
            return
        logger.info("%s: %d warm-up requests", self.where, n)
        bench = ServeBenchConfig(base_url=base_url, workload="chat", num_requests=n,
                                 concurrency=n, seed=WARMUP_SEED, max_output_tokens=8,
                                 model=self.spec.model, api_key=self.config.api_key,
                                 progress=False)
        try:
            results = asyncio.run(serve.benchmark(bench))
        except (RuntimeError, ValueError) as exc:
            logger.warning("%s: warm-up failed: %s", self.where, exc)
            return
        if results["num_failed"]:
            logger.warning("%s: %d warm-up requests failed: %s", self.where,
                           results["num_failed"], results["first_error"])

    def _run_one(self, workload: WorkloadSpec, k: int, base_url: str,
                 process: ServeProcess | None) -> dict:
        bench = workload.run_config(k, base_url, self.spec.model, self.config.api_key)
        load = _load_text(workload, k)
        run = {"cluster": self.spec.name, "workload": workload.label,
               "load_value": workload.values[k], "seed": bench.seed, "error": None,
               "results": None, "server_metrics": None}
        if process is not None and not process.alive:
            run["error"] = (f"baton serve exited with code {process.proc.returncode}; its last "
                            f"output:\n{process.output_tail()}")
            logger.error("%s: %s at %s not run: %s", self.where, workload.label, load, run["error"])
            return run
        logger.info("%s: %s at %s: %d requests", self.where, workload.label, load,
                    bench.num_requests)
        try:
            run["results"], run["server_metrics"] = asyncio.run(
                _measure(bench, self.config.api_key))
        except (RuntimeError, ValueError) as exc:
            run["error"] = str(exc)
            logger.error("%s: %s at %s failed: %s", self.where, workload.label, load, exc)
            return run
        for warning in run["server_metrics"]["warnings"]:
            if warning not in self.warned:  # once per cluster, not once per run
                self.warned.add(warning)
                logger.warning("%s: %s", self.where, warning)
        r = run["results"]
        hit = ((run["server_metrics"]["prefix_cache"] or {}).get("decode") or {}).get("hit_rate")
        logger.info("%s: %s at %s: %d done, %d failed in %.1f s; TTFT p99 %s ms, ITL p99 %s ms, "
                    "decode prefix hit rate %s", self.where, workload.label, load,
                    r["num_completed"], r["num_failed"], r["duration_s"],
                    _ms(r["ttft_ms"]["p99"]), _ms(r["itl_ms"]["p99"]),
                    "-" if hit is None else f"{hit:.2f}")
        return run


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _workload_json(w: WorkloadSpec) -> dict:
    b = w.bench
    return {"label": w.label, "workload": b.workload, "load": w.load, "values": list(w.values),
            "num_requests": b.num_requests, "seed": b.seed,
            "max_output_tokens": b.max_output_tokens,
            "num_prefixes": b.num_prefixes, "prefix_tokens": b.prefix_tokens,
            "endpoint": b.endpoint, "ignore_eos": b.ignore_eos,
            "goodput_slos_ms": dict(b.goodput_slos_ms)}


def run(config: CompareConfig) -> dict:
    """Run every cluster of the comparison in turn, write the results (module docstring)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    clusters: list[dict] = []
    runs: list[dict] = []
    with _sigterm_interrupts():
        for index, spec in enumerate(config.clusters):
            clusters.append(_ClusterRun(config, index, spec, runs).run())
    r = {
        "name": config.name, "command": config.command,
        "config_file": str(config.path) if config.path else None, "config_text": config.text,
        "started_at": started_at, "duration_s": time.perf_counter() - t0,
        "machine": {"cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m": [load_before, os.getloadavg()[0]]},
        "clusters": clusters, "workloads": [_workload_json(w) for w in config.workloads],
        "runs": runs,
    }
    emit(r, config.out_dir, config.name, render_markdown(r), render_plots)
    problems = [f"cluster {c['name']} did not start" for c in clusters if c["error"]]
    problems += [f"{run['cluster']}: {run['workload']} at {run['load_value']:g} "
                 + ("failed" if run["error"] else "had no successful request")
                 for run in runs if run["error"] or not run["results"]["num_completed"]]
    if problems:
        raise RuntimeError("; ".join(problems))
    return r
