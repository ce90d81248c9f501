"""The serving benchmark's numbers: per-request records, the metrics over them, the table.

Definitions (those of vLLM's `vllm bench serve`), in milliseconds:

  TTFT      time from sending a request to its first chunk that carries content (a role-only or
            empty chunk does not count)
  ITL       each gap between two successive chunks that carry content, over all requests
  TPOT      per request, (E2E - TTFT) / (output tokens - 1); requests with one output token have none
  E2E       time from sending a request to the end of its stream
  goodput   requests per second that succeeded and met every given SLO (ttft, tpot, e2el; a
            request without a TPOT meets the tpot SLO)

Throughputs divide by the benchmark's duration (first request sent to last one done) and count
successful requests only; a failed request counts in num_failed, with its error in its record,
and never in a latency. Output tokens are the server's usage.completion_tokens when it reports
usage, else the number of content chunks; prompt tokens likewise usage.prompt_tokens, else the
workload's count. Percentiles interpolate linearly between the nearest ranks (numpy's default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

SLO_METRICS = ("ttft", "tpot", "e2el")
STATISTICS = ("mean", "median", "p90", "p99")


@dataclass
class RequestRecord:
    index: int  # position in the workload
    kind: str  # the workload kind of the request
    max_tokens: int
    prompt_tokens: int
    output_tokens: int = 0
    start_ms: float = 0.0  # when it was sent, after the benchmark's start
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    latency_ms: float | None = None  # E2E
    error: str | None = None  # None = succeeded

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_ms(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_ms is None or self.latency_ms is None:
            return None
        return (self.latency_ms - self.ttft_ms) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return {**asdict(self), "tpot_ms": self.tpot_ms}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def statistics(values: Sequence[float]) -> dict[str, float | None]:
    """mean, median, p90 and p99 of values (all None when there are none)."""
    return {"mean": sum(values) / len(values) if values else None,
            "median": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    if not record.ok:
        return False
    value = {"ttft": record.ttft_ms, "tpot": record.tpot_ms or 0.0, "e2el": record.latency_ms}
    return all(value[name] is not None and value[name] <= limit for name, limit in slos_ms.items())


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slos_ms: dict[str, float]) -> dict:
    """The benchmark's metrics over its records (module docstring); duration_s > 0."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    unknown = sorted(set(slos_ms) - set(SLO_METRICS))
    if unknown:
        raise ValueError(f"goodput SLOs must be among {', '.join(SLO_METRICS)}, got {unknown}")
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    tpots = [r.tpot_ms for r in done if r.tpot_ms is not None]
    return {
        "duration_s": duration_s,
        "num_completed": len(done),
        "num_failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "goodput": (sum(meets_slos(r, slos_ms) for r in done) / duration_s) if slos_ms else None,
        "ttft_ms": statistics([r.ttft_ms for r in done if r.ttft_ms is not None]),
        "tpot_ms": statistics(tpots),
        "itl_ms": statistics([gap for r in done for gap in r.itl_ms]),
        "e2e_ms": statistics([r.latency_ms for r in done if r.latency_ms is not None]),
    }


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """The human-readable report of results (summarize's fields plus the run's settings)."""
    slos = results.get("goodput_slos_ms") or {}
    rate = results.get("request_rate")
    load = (f"closed loop, {results['concurrency']} in flight" if results.get("concurrency")
            else "all at once" if rate is None else f"Poisson, {rate:g} requests/s")
    rows = [
        ("server", f"{results.get('base_url', '-')} ({results.get('endpoint', '-')} endpoint, "
                   + f"model {results.get('model', '-')})"),
        ("workload", f"{results.get('workload', '-')}, seed {results.get('seed', '-')}, {load}"),
        ("successful requests", str(results["num_completed"])),
        ("failed requests", str(results["num_failed"])),
    ]
    if results["first_error"]:
        rows.append(("first error", results["first_error"][:200]))
    rows += [
        ("duration (s)", _number(results["duration_s"])),
        ("prompt tokens", str(results["total_prompt_tokens"])),
        ("output tokens", str(results["total_output_tokens"])),
        ("request throughput (req/s)", _number(results["request_throughput"])),
        ("output token throughput (tok/s)", _number(results["output_token_throughput"])),
        ("total token throughput (tok/s)", _number(results["total_token_throughput"])),
    ]
    if slos:
        limits = ", ".join(f"{name} <= {limit:g} ms" for name, limit in slos.items())
        rows.append((f"goodput (req/s; {limits})", _number(results["goodput"])))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += ["", f"{'latency (ms)':<12}" + "".join(f"{s:>10}" for s in STATISTICS)]
    for label, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                       ("E2E", "e2e_ms")):
        lines.append(f"{label:<12}" + "".join(f"{_number(results[key][s]):>10}" for s in STATISTICS))
    return "\n".join(lines) + "\n"
