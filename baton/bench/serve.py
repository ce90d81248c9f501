"""The client of `baton bench serve`: streams a workload's requests to an OpenAI-compatible server
and times every chunk.

Lifecycle of a run: build the workload and its arrival times from the seed -> ask GET /v1/models
for the model unless given -> send every request (open loop at its arrival time, or a closed loop
of `concurrency` senders) on one asyncio loop, each timed from just before its POST -> summarize
(baton.bench.serve_report) -> print the table, write the JSON.

A request never raises out of send_request: an HTTP error status, an error event in the stream, a
stream that ends before its finish, one without content, a timeout or a lost connection all
become its record's error. The client holds no connection limit, so requests released together
go out together and none waits in a pool, which would count in its TTFT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TextIO

import httpx

from baton.bench.serve_config import ServeBenchConfig
from baton.bench.serve_report import RequestRecord, format_table, summarize
from baton.bench.serve_workloads import WorkloadRequest, arrival_times, make_workload

logger = logging.getLogger(__name__)

Send = Callable[[int, WorkloadRequest], Awaitable[RequestRecord]]


class StreamTimer:
    """Turns one response's server-sent events into a RequestRecord: feed(line, now) per line,
    then finish(now). Times are time.perf_counter() seconds; start is when the POST began."""

    def __init__(self, record: RequestRecord, start: float) -> None:
        self.record = record
        self.start = start
        self.last_content: float | None = None
        self.num_chunks = 0  # chunks that carried content
        self.usage: dict | None = None
        self.finished = False  # a finish_reason or [DONE] was seen

    def feed(self, line: str, now: float) -> bool:
        """Take one line of the stream; True once the stream says it is done."""
        if not line.startswith("data:"):
            return False  # blank separators, comments, event: lines
        data = line[5:].strip()
        if data == "[DONE]":
            self.finished = True
            return True
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            self.record.error = f"the stream sent a line that is not JSON: {data[:200]!r}"
            return True
        if not isinstance(payload, dict):
            return False
        if payload.get("error"):
            self.record.error = f"error in the stream: {_error_message(payload)}"
            return True
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
            if text is None:
                text = choice.get("text")  # /v1/completions
            if text:
                self._content(now)
            if choice.get("finish_reason") is not None:
                self.finished = True
        return False

    def _content(self, now: float) -> None:
        if self.last_content is None:
            self.record.ttft_ms = (now - self.start) * 1e3
        else:
            self.record.itl_ms.append((now - self.last_content) * 1e3)
        self.last_content = now
        self.num_chunks += 1

    def finish(self, now: float) -> RequestRecord:
        record = self.record
        record.latency_ms = (now - self.start) * 1e3
        usage = self.usage or {}
        record.output_tokens = _whole(usage.get("completion_tokens"), self.num_chunks)
        record.prompt_tokens = _whole(usage.get("prompt_tokens"), record.prompt_tokens)
        if record.error is None and not self.finished:
            record.error = "the stream ended before a finish_reason or [DONE]"
        elif record.error is None and self.num_chunks == 0:
            record.error = "the stream carried no content"
        return record


def _whole(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _error_message(payload: object) -> str:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if error:
            return str(error)
    return str(payload)[:300]


def request_body(config: ServeBenchConfig, model: str, request: WorkloadRequest) -> dict:
    body: dict = {"model": model, "max_tokens": request.max_tokens, "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "completions":
        body["prompt"] = (f"{request.system}\n\n{request.prompt}" if request.system
                          else request.prompt)
    else:
        system = [{"role": "system", "content": request.system}] if request.system else []
        body["messages"] = system + [{"role": "user", "content": request.prompt}]
    return body


def _endpoint_url(config: ServeBenchConfig) -> str:
    path = "chat/completions" if config.endpoint == "chat" else "completions"
    return f"{config.base_url.rstrip('/')}/v1/{path}"


async def send_request(client: httpx.AsyncClient, config: ServeBenchConfig, model: str,
                       index: int, request: WorkloadRequest, t0: float) -> RequestRecord:
    """One streamed request, timed; failures land in the record (module docstring)."""
    record = RequestRecord(index=index, kind=request.kind, max_tokens=request.max_tokens,
                           prompt_tokens=request.num_prompt_tokens)
    start = time.perf_counter()
    record.start_ms = (start - t0) * 1e3
    timer = StreamTimer(record, start)

    async def stream() -> None:
        async with client.stream("POST", _endpoint_url(config),
                                 json=request_body(config, model, request)) as response:
            if response.status_code != 200:
                await response.aread()
                try:
                    message = _error_message(response.json())
                except ValueError:
                    message = response.text[:300]
                record.error = f"HTTP {response.status_code}: {message}"
                return
            async for line in response.aiter_lines():
                if timer.feed(line, time.perf_counter()):
                    return

    try:
        await asyncio.wait_for(stream(), config.timeout_s)
    except asyncio.TimeoutError:
        record.error = f"no complete answer within {config.timeout_s:g} s"
    except (httpx.HTTPError, OSError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    timer.finish(time.perf_counter())
    if record.error is not None:
        logger.debug("request_id=%s failed: %s", index, record.error)
    return record


async def _open_loop(send: Send, requests: Sequence[WorkloadRequest], arrivals: Sequence[float],
                     t0: float) -> list[RequestRecord]:
    tasks = []
    for index, (request, at) in enumerate(zip(requests, arrivals)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(index, request)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(send: Send, requests: Sequence[WorkloadRequest],
                       concurrency: int) -> list[RequestRecord]:
    records: list[RequestRecord | None] = [None] * len(requests)
    indices = iter(range(len(requests)))  # shared: each sender takes the next one

    async def sender() -> None:
        for index in indices:
            records[index] = await send(index, requests[index])

    await asyncio.gather(*(sender() for _ in range(min(concurrency, len(requests)))))
    return [r for r in records if r is not None]


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, else one line per tenth."""

    def __init__(self, total: int, stream: TextIO | None, enabled: bool) -> None:
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.done = self.failed = 0
        self.tty = self.stream.isatty()

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.ok
        if not self.enabled:
            return
        line = f"bench serve: {self.done}/{self.total} requests done, {self.failed} failed"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if self.done == self.total else ""))
        elif self.done == self.total or self.done * 10 // self.total > (self.done - 1) * 10 // self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


async def _resolve_model(client: httpx.AsyncClient, config: ServeBenchConfig) -> str:
    if config.model:
        return config.model
    url = f"{config.base_url.rstrip('/')}/v1/models"
    try:
        response = await client.get(url, timeout=30)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach the server at {config.base_url} ({exc}); is it "
                           "running? Pass its address with --base-url") from None
    try:
        models = response.json().get("data") if response.status_code == 200 else None
        model = models[0]["id"] if models else None
    except (ValueError, AttributeError, LookupError, TypeError):
        model = None
    if not model:
        raise RuntimeError(f"GET {url} answered HTTP {response.status_code} with no model "
                           f"({response.text[:200]!r}); name one with --model")
    return str(model)


async def benchmark(config: ServeBenchConfig, progress: TextIO | None = None) -> dict:
    """Run the benchmark; the results as summarize() gives them, plus the run's settings and
    every request's record."""
    tokenizer = None
    if config.tokenizer is not None:
        from engine.tokenizer import Tokenizer  # torch-free

        tokenizer = Tokenizer.from_dir(config.tokenizer)
    requests = make_workload(config.workload, config.num_requests, config.seed,
                             max_output_tokens=config.max_output_tokens, tokenizer=tokenizer,
                             num_prefixes=config.num_prefixes, prefix_tokens=config.prefix_tokens)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0), pool=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = await _resolve_model(client, config)
        bar = Progress(len(requests), progress, config.progress)
        t0 = time.perf_counter()

        async def send(index: int, request: WorkloadRequest) -> RequestRecord:
            record = await send_request(client, config, model, index, request, t0)
            bar.update(record)
            return record

        if config.concurrency is not None:
            records = await _closed_loop(send, requests, config.concurrency)
        else:
            arrivals = arrival_times(len(requests), config.request_rate, config.seed)
            records = await _open_loop(send, requests, arrivals, t0)
        duration_s = time.perf_counter() - t0
    slos = dict(config.goodput_slos_ms)
    settings = {
        "command": config.command, "base_url": config.base_url, "endpoint": config.endpoint,
        "model": model, "workload": config.workload, "num_requests": config.num_requests,
        "request_rate": None if math.isinf(config.request_rate) else config.request_rate,
        "concurrency": config.concurrency, "seed": config.seed, "ignore_eos": config.ignore_eos,
        "max_output_tokens": config.max_output_tokens, "num_prefixes": config.num_prefixes,
        "prefix_tokens": config.prefix_tokens,
        "tokenizer": str(config.tokenizer) if config.tokenizer else None,
        "goodput_slos_ms": slos,
    }
    return {**settings, **summarize(records, duration_s, slos),
            "requests": [r.to_json() for r in records]}


def run(config: ServeBenchConfig) -> dict:
    """The entry point of `baton bench serve`: run, print the table, write --out; raise
    RuntimeError when every request failed (after reporting them)."""
    results = asyncio.run(benchmark(config))
    sys.stdout.write(format_table(results))
    sys.stdout.flush()
    if config.out is not None:
        path = Path(config.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        logger.info("wrote %s", path)
    if results["num_completed"] == 0:
        raise RuntimeError(f"all {results['num_failed']} requests failed; the first error: "
                           f"{results['first_error']}")
    return results
