"""What a Baton cluster counted during one run of `baton bench compare`: Prometheus counters
scraped before and after, and their differences.

A snapshot reads the router's GET /cluster (every worker's id, role and metrics URL), then every
worker's /metrics and the router's /metrics, all at once. Each part that cannot be read (a server
that is not Baton has no /cluster; a worker that does not answer) becomes a warning and leaves
its fields null: a scrape never fails a run.

From two snapshots (run_deltas), for the workers present in both:

  prefix_cache       per role: queries and hits (prompt tokens, baton_prefix_cache_*_total) and
                     hit_rate = hits / queries (null without queries)
  kv_transfer_bytes  per role: baton_kv_transfer_bytes_total (received on decode, sent on prefill)
  routing_decisions  per mode (local, remote): the router's baton_routing_decisions_total, summed
                     over reasons

A counter that went down was reset (its process restarted): its difference is its new value.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

QUERIES, HITS = "baton_prefix_cache_queries_total", "baton_prefix_cache_hits_total"
KV_BYTES = "baton_kv_transfer_bytes_total"
ROUTING = "baton_routing_decisions_total"
WORKER_COUNTERS = (QUERIES, HITS, KV_BYTES)
SCRAPE_TIMEOUT_S = 10.0


def counter_sums(text: str, names: tuple[str, ...], by: str | None = None) -> dict[str, dict]:
    """{name: {value of label `by` ("" without one): sum of the samples}} for each of names
    (sample names, e.g. baton_prefix_cache_hits_total) in Prometheus text; ValueError if the
    text does not parse."""
    sums: dict[str, dict] = {name: {} for name in names}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums:
                key = sample.labels.get(by, "") if by else ""
                sums[sample.name][key] = sums[sample.name].get(key, 0.0) + sample.value
    return sums


@dataclass
class Snapshot:
    # worker id -> (role, {counter: value}); None = the cluster's workers are unknown
    workers: dict[str, tuple[str, dict[str, float]]] | None = None
    routing: dict[str, float] | None = None  # mode -> decisions; None = no router metrics
    warnings: list[str] = field(default_factory=list)


async def _get_text(client: httpx.AsyncClient, url: str) -> str:
    """The body of GET url; RuntimeError saying why not."""
    try:
        response = await client.get(url, timeout=SCRAPE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise RuntimeError(f"GET {url} answered HTTP {response.status_code}")
    return response.text


async def _worker_counters(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    sums = counter_sums(await _get_text(client, url), WORKER_COUNTERS)
    return {name: sum(by.values()) for name, by in sums.items()}


async def _workers(client: httpx.AsyncClient, base_url: str) -> list[dict]:
    text = await _get_text(client, f"{base_url}/cluster")
    try:
        workers = json.loads(text)["workers"]
        return [w for w in workers if w.get("id") and w.get("role") and w.get("metrics_url")]
    except (ValueError, LookupError, TypeError, AttributeError):
        raise RuntimeError(f"GET {base_url}/cluster did not list workers") from None


async def snapshot(client: httpx.AsyncClient, base_url: str) -> Snapshot:
    """The cluster's counters now (module docstring); never raises for an unreadable part."""
    result = Snapshot()

    async def router() -> None:
        try:
            text = await _get_text(client, f"{base_url}/metrics")
            result.routing = counter_sums(text, (ROUTING,), by="mode")[ROUTING]
        except (RuntimeError, ValueError) as exc:
            result.warnings.append(f"no routing decisions: {exc}")

    async def workers() -> None:
        try:
            listed = await _workers(client, base_url)
        except RuntimeError as exc:
            result.warnings.append(f"no worker metrics: {exc}")
            return
        scraped = await asyncio.gather(*(_worker_counters(client, w["metrics_url"])
                                         for w in listed), return_exceptions=True)
        result.workers = {}
        for worker, counters in zip(listed, scraped):
            if isinstance(counters, (RuntimeError, ValueError)):
                result.warnings.append(f"worker {worker['id']} left out: {counters}")
            elif isinstance(counters, BaseException):
                raise counters
            else:
                result.workers[worker["id"]] = (worker["role"], counters)

    await asyncio.gather(router(), workers())
    return result


def _delta(before: float, after: float) -> float:
    return after - before if after >= before else after  # a reset counter starts again at 0


def run_deltas(before: Snapshot, after: Snapshot) -> dict:
    """What the cluster counted between two snapshots (module docstring), with the warnings of
    both."""
    warnings = list(dict.fromkeys(before.warnings + after.warnings))
    result: dict = {"prefix_cache": None, "kv_transfer_bytes": None, "routing_decisions": None}
    if before.routing is not None and after.routing is not None:
        modes = sorted(set(before.routing) | set(after.routing))
        result["routing_decisions"] = {m: _delta(before.routing.get(m, 0.0),
                                                 after.routing.get(m, 0.0)) for m in modes}
    if before.workers is not None and after.workers is not None:
        both = sorted(set(before.workers) & set(after.workers))
        changed = sorted(set(before.workers) ^ set(after.workers))
        if changed:
            warnings.append(f"workers not in both scrapes, left out: {', '.join(changed)}")
        per_role: dict[str, dict[str, float]] = {}
        for worker in both:
            role, counters = after.workers[worker]
            totals = per_role.setdefault(role, dict.fromkeys(WORKER_COUNTERS, 0.0))
            for name in WORKER_COUNTERS:
                totals[name] += _delta(before.workers[worker][1][name], counters[name])
        result["prefix_cache"] = {role: {
            "queries": t[QUERIES], "hits": t[HITS],
            "hit_rate": t[HITS] / t[QUERIES] if t[QUERIES] else None,
        } for role, t in sorted(per_role.items())}
        result["kv_transfer_bytes"] = {role: t[KV_BYTES] for role, t in sorted(per_role.items())}
    result["warnings"] = warnings
    return result
