"""Every Prometheus metric Baton exports, in one place (see docs/metrics.md).

Each component builds its metrics on its own CollectorRegistry, so several components can live in
one process (tests) and each worker serves only its own series. Names follow DESIGN §6: prefix
`baton_`, Prometheus units in the name, labels model / role / worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from engine.stats import EngineStats, StepTiming

# Latency buckets (seconds) from 1 ms to 60 s; TTFT and ITL on a CPU span that whole range.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        self.registry = registry
        self.model = model
        self.time_to_first_token = Histogram(
            "baton_time_to_first_token_seconds", "Time from arrival to the first token.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        ).labels(model)
        self.inter_token_latency = Histogram(
            "baton_inter_token_latency_seconds", "Time between two tokens of one stream.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        ).labels(model)
        self.e2e_request_latency = Histogram(
            "baton_e2e_request_latency_seconds", "Time from arrival to the last token.",
            ["model"], buckets=LATENCY_BUCKETS, registry=registry,
        ).labels(model)
        self._requests = Counter(
            "baton_requests_total", "Requests that ended, by finish reason or error.",
            ["model", "finish_reason"], registry=registry,
        )
        self.prompt_tokens = Counter(
            "baton_prompt_tokens_total", "Prompt tokens of finished requests.",
            ["model"], registry=registry,
        ).labels(model)
        self.generation_tokens = Counter(
            "baton_generation_tokens_total", "Generated tokens.", ["model"], registry=registry,
        ).labels(model)
        self.request_retries = Counter(
            "baton_request_retries_total",
            "Requests sent to other workers before their first token: a decode worker that was "
            "unavailable, or a failed prefill done on the decode worker instead.",
            ["model"], registry=registry,
        ).labels(model)
        self.request_migrations = Counter(
            "baton_request_migrations_total",
            "Requests moved to another decode worker after theirs failed mid-stream.",
            ["model"], registry=registry,
        ).labels(model)

        self._routing_decisions = Counter(
            "baton_routing_decisions_total",
            "Routing plans made, by prefill mode (remote: on a prefill worker; local: on the "
            "decode worker) and reason (cost, short, no_prefill, resume, always).",
            ["model", "mode", "reason"], registry=registry,
        )
        self.prefix_index_cached_tokens = Counter(
            "baton_router_prefix_index_hit_tokens_total",
            "Prompt tokens the global prefix index said the chosen decode worker holds.",
            ["model"], registry=registry,
        ).labels(model)

    def routed(self, mode: str, reason: str, cached_tokens: int) -> None:
        self._routing_decisions.labels(self.model, mode, reason).inc()
        self.prefix_index_cached_tokens.inc(cached_tokens)

    def request_finished(self, finish_reason: str) -> None:
        self._requests.labels(self.model, finish_reason).inc()


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry, model: str, role: str, worker: str) -> None:
        self.registry = registry
        labels = ["model", "role", "worker"]
        values = (model, role, worker)
        self.num_requests_running = Gauge(
            "baton_num_requests_running", "Requests in the running batch.",
            labels, registry=registry,
        ).labels(*values)
        self.num_requests_waiting = Gauge(
            "baton_num_requests_waiting", "Requests waiting for prefill or for their KV.",
            labels, registry=registry,
        ).labels(*values)
        self.kv_cache_usage_ratio = Gauge(
            "baton_kv_cache_usage_ratio", "Share of KV blocks in use (0 to 1).",
            labels, registry=registry,
        ).labels(*values)
        self.kv_transfer_bytes = Counter(
            "baton_kv_transfer_bytes_total",
            "KV bytes moved between workers, payloads and int8 scales (received on decode, sent on "
            "prefill).",
            labels, registry=registry,
        ).labels(*values)
        self.kv_transfer_seconds = Histogram(
            "baton_kv_transfer_seconds",
            "Decode: time from the reservation of a request's KV to its last chunk written, "
            "for completed transfers.",
            labels, buckets=LATENCY_BUCKETS, registry=registry,
        ).labels(*values)
        self._kv_transfer_failures = Counter(
            "baton_kv_transfer_failures_total", "KV transfers that failed, by reason.",
            [*labels, "reason"], registry=registry,
        )
        self._kv_transfer_refused_pushes = Counter(
            "baton_kv_transfer_refused_pushes_total",
            "Decode: KV pushes refused without failing a transfer (a transfer no longer "
            "expected, an older attempt), by reason.",
            [*labels, "reason"], registry=registry,
        )
        self.kv_transfer_skipped_blocks = Counter(
            "baton_kv_transfer_skipped_blocks_total",
            "Decode: full KV blocks of remote-prefill prompts already in the prefix cache, "
            "so not transferred.",
            labels, registry=registry,
        ).labels(*values)
        self._step_seconds = Histogram(
            "baton_engine_step_seconds",
            "Wall time of one engine step, by phase: prefill (the batch computes prompt tokens "
            "or recomputes) or decode (only each sequence's newest token).",
            [*labels, "phase"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._prefill_step = self._step_seconds.labels(*values, "prefill")
        self._decode_step = self._step_seconds.labels(*values, "decode")
        self._labels, self._values = labels, values

    def declare_kv_transfer_reasons(
        self, failure_reasons: Iterable[str], refusal_reasons: Iterable[str]
    ) -> None:
        """Create each reason's series at 0, so it shows before its first increment."""
        for reason in failure_reasons:
            self._kv_transfer_failures.labels(*self._values, reason)
        for reason in refusal_reasons:
            self._kv_transfer_refused_pushes.labels(*self._values, reason)

    def count_kv_transfer_failure(self, reason: str) -> None:
        self._kv_transfer_failures.labels(*self._values, reason).inc()

    def count_kv_transfer_refused_push(self, reason: str) -> None:
        self._kv_transfer_refused_pushes.labels(*self._values, reason).inc()

    def observe_step(self, step: StepTiming) -> None:
        (self._prefill_step if step.is_prefill else self._decode_step).observe(step.seconds)

    def track_engine_stats(self, read: Callable[[], EngineStats]) -> None:
        """Export the engine's cumulative counters, read at scrape time."""
        self.registry.register(_EngineStatsCollector(read, self._labels, self._values))


class _EngineStatsCollector:
    """Counters kept by the engine itself (engine/stats.py), exported when Prometheus scrapes."""

    _COUNTERS = (
        ("baton_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
         "prefix_cache_queries"),
        ("baton_prefix_cache_hits",
         "Prompt tokens found in the prefix cache (not computed, not received).",
         "prefix_cache_hits"),
        ("baton_num_preemptions", "Sequences preempted for lack of KV blocks (to be recomputed).",
         "num_preemptions"),
    )

    def __init__(self, read: Callable[[], EngineStats], labels: list[str], values: tuple) -> None:
        self._read, self._labels, self._values = read, labels, values

    def collect(self):
        stats = self._read()
        for name, documentation, field in self._COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=self._labels)
            family.add_metric(self._values, getattr(stats, field))
            yield family
