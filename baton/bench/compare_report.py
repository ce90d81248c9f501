"""The comparison's results as the project reads them: tables per workload, ratios to the first
cluster, plots. Torch-free; matplotlib (Agg) only inside the plots.

Input is the result dict of baton.bench.compare.run (also <name>.json): `clusters` in order (the
first is the baseline), `workloads`, and `runs`, one per (cluster, workload, load value) that was
attempted, each with the benchmark's results (baton.bench.serve) or an error. Latencies are in
ms. A number that is missing (a failed run, a cluster that did not start, an unscraped counter)
is "-" in the markdown and makes every ratio that needs it None.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from baton.bench.report import div, fmt, plot_panels

TITLE = "# Serving comparison: "  # the first line of every report; compare overwrites no other
LOAD_LABELS = {"request_rate": ("rate (req/s)", "request rate (req/s)"),
               "concurrency": ("concurrency", "requests in flight")}
MIB = 1 << 20


def find_run(r: dict, workload: str, cluster: str, value: float) -> dict | None:
    return next((run for run in r["runs"] if (run["workload"], run["cluster"], run["load_value"])
                 == (workload, cluster, value)), None)


def metric(run: dict | None, key: str, stat: str | None = None) -> float | None:
    """results[key] (or results[key][stat]) of a run; None if the run has no results."""
    results = (run or {}).get("results")
    if not results:
        return None
    value = results.get(key)
    return value.get(stat) if stat and isinstance(value, dict) else value


def hit_rate(run: dict | None, role: str) -> float | None:
    prefix = ((run or {}).get("server_metrics") or {}).get("prefix_cache") or {}
    return (prefix.get(role) or {}).get("hit_rate")


RATIOS = (("TTFT p50", "ttft_ms", "median"), ("TTFT p99", "ttft_ms", "p99"),
          ("ITL p99", "itl_ms", "p99"), ("output tok/s", "output_token_throughput", None))


def ratios(r: dict, workload: str) -> list[dict]:
    """Each cluster but the first against the first, at each load it was run at: {cluster,
    load_value, and each label of RATIOS: cluster's value ÷ baseline's (None when one is
    missing)}."""
    names = [c["name"] for c in r["clusters"]]
    spec = next(w for w in r["workloads"] if w["label"] == workload)
    rows = []
    for name in names[1:]:
        for value in spec["values"]:
            base, other = (find_run(r, workload, n, value) for n in (names[0], name))
            if other is None:  # never attempted: the cluster did not start
                continue
            row = {"cluster": name, "load_value": value}
            row.update({label: div(metric(other, key, stat), metric(base, key, stat))
                        for label, key, stat in RATIOS})
            rows.append(row)
    return rows


def _load_text(load: str, value: float) -> str:
    return f"{value:g}" if load == "request_rate" else str(int(value))


def _cluster_rows(r: dict) -> list[str]:
    lines = ["| cluster | what ran | model | ready after (s) |", "|---|---|---|---:|"]
    for c in r["clusters"]:
        model = next((metric(run, "model") for run in r["runs"]
                      if run["cluster"] == c["name"] and run.get("results")), None)
        if c["error"]:
            what = f"**did not start**: {c['error'].splitlines()[0]}"
        elif not c["started"]:
            what = f"a server already running at {c['base_url']}"
        elif c.get("workers"):
            roles = c["workers"]
            what = (f"`baton serve`: {roles.get('prefill', 0)} prefill + {roles.get('decode', 0)} "
                    "decode workers")
        else:
            what = "`baton serve`"
        lines.append(f"| {c['name']} | {what} | {model or '-'} | {fmt(c.get('startup_s'), 0)} |")
    return lines


def _each_run(r: dict, w: dict):
    """(cluster, load value as text, run) for every attempted run of workload w, in order."""
    for c in r["clusters"]:
        for value in w["values"]:
            run = find_run(r, w["label"], c["name"], value)
            if run is not None:
                yield c["name"], _load_text(w["load"], value), run


def _results_table(r: dict, w: dict) -> list[str]:
    lines = [(f"| cluster | {LOAD_LABELS[w['load']][0]} | req/s | output tok/s | TTFT p50 | "
              "TTFT p99 | ITL p50 | ITL p99 | TPOT p50 | E2E p50 | prefix hit rate | failed |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    latencies = (("ttft_ms", "median"), ("ttft_ms", "p99"), ("itl_ms", "median"),
                 ("itl_ms", "p99"), ("tpot_ms", "median"), ("e2e_ms", "median"))
    for name, load, run in _each_run(r, w):
        cells = [fmt(metric(run, "request_throughput")),
                 fmt(metric(run, "output_token_throughput"), 1),
                 *(fmt(metric(run, key, stat), 0) for key, stat in latencies),
                 fmt(hit_rate(run, "decode")),
                 "run failed" if run.get("error") else str(metric(run, "num_failed"))]
        lines.append(f"| {name} | {load} | " + " | ".join(cells) + " |")
    return lines


def _ratio_table(r: dict, w: dict) -> list[str]:
    lines = [(f"Each cluster ÷ {r['clusters'][0]['name']} at the same load (lower is better "
              "for latency, higher for throughput):"), "",
             f"| cluster | {LOAD_LABELS[w['load']][0]} | "
             + " | ".join(label for label, _, _ in RATIOS) + " |",
             "|---|---:|" + "---:|" * len(RATIOS)]
    for row in ratios(r, w["label"]):
        lines.append(f"| {row['cluster']} | {_load_text(w['load'], row['load_value'])} | "
                     + " | ".join(fmt(row[label]) for label, _, _ in RATIOS) + " |")
    return lines


def _counters_table(r: dict, w: dict) -> list[str]:
    lines = ["What the clusters counted during each run (Prometheus; - where not scraped):", "",
             (f"| cluster | {LOAD_LABELS[w['load']][0]} | prefix hit rate, decode | "
              "prefix hit rate, prefill | KV transferred (MiB) | routing: local / remote |"),
             "|---|---:|---:|---:|---:|---|"]
    for name, load, run in _each_run(r, w):
        server = run.get("server_metrics") or {}
        kv, routing = server.get("kv_transfer_bytes"), server.get("routing_decisions")
        kv_text = "-" if kv is None else fmt(kv.get("decode", 0) / MIB, 1)
        routing_text = ("-" if routing is None
                        else f"{routing.get('local', 0):g} / {routing.get('remote', 0):g}")
        lines.append(f"| {name} | {load} | {fmt(hit_rate(run, 'decode'))} | "
                     f"{fmt(hit_rate(run, 'prefill'))} | {kv_text} | {routing_text} |")
    return lines


def _workload_section(r: dict, w: dict) -> list[str]:
    values = ", ".join(_load_text(w["load"], v) for v in w["values"])
    how = (f"Poisson arrivals at {values} requests/s" if w["load"] == "request_rate"
           else f"a closed loop of {values} requests in flight")
    prefixes = (f", {w['num_prefixes']} prefixes of {w['prefix_tokens']} tokens"
                if w["workload"] in ("shared-prefix", "mixed") else "")
    stem = f"{r['name']}-{w['label']}"
    lines = ["", f"## {w['label']}", "",
             (f"Workload `{w['workload']}`{prefixes}: {w['num_requests']} requests at each load, "
              f"seed {w['seed']} (+k at the k-th load), max_output_tokens "
              f"{w['max_output_tokens']}; {how}. Latencies in ms."), "",
             *_results_table(r, w), ""]
    if len(r["clusters"]) > 1:
        lines += [*_ratio_table(r, w), ""]
    return lines + [*_counters_table(r, w), "",
                    f"![TTFT p99, ITL p99 and throughput against load]({stem}-latency.png)", "",
                    f"![TTFT and ITL CDFs at the highest load]({stem}-cdf.png)"]


DEFINITIONS = """\
## Definitions

- TTFT, ITL, TPOT, E2E latency and throughputs as `baton bench serve` measures them at the client
  (docs/benchmarks/serving.md): TTFT from sending a request to its first content chunk; ITL every
  gap between content chunks; TPOT per request (E2E − TTFT) / (output tokens − 1); throughputs
  count successful requests over the run's duration. Failed requests enter no latency.
- Prefix hit rate: Δ `baton_prefix_cache_hits_total` ÷ Δ `baton_prefix_cache_queries_total`
  over the run, summed over the workers of a role (prompt tokens found cached ÷ looked up).
- KV transferred: Δ `baton_kv_transfer_bytes_total` of the decode workers (bytes received).
- Routing: Δ `baton_routing_decisions_total` of the router by mode: local (prefilled on the
  decode worker) or remote (on a prefill worker)."""


def render_markdown(r: dict) -> str:
    m = r["machine"]
    names = [c["name"] for c in r["clusters"]]
    lines = [
        f"{TITLE}{r['name']}", "",
        (f"`{r['command']}` — "
         + (f"{len(names)} clusters, run one after another and given the same requests at each "
            f"load (config below); ratios are each cluster ÷ {names[0]}. " if len(names) > 1
            else "one cluster (config below). ")
         + "Every number comes from this one run on this one machine: "
         f"{m['cpu_count']} CPU cores, {m['processor']}, Python {m['python']}; 1-minute load "
         f"average {m['load_average_1m'][0]:.1f} before and {m['load_average_1m'][1]:.1f} after "
         f"(the client shares the machine with the cluster). The run took "
         f"{r['duration_s'] / 60:.1f} minutes."), "",
        *_cluster_rows(r),
    ]
    for w in r["workloads"]:
        lines += _workload_section(r, w)
    lines += ["", DEFINITIONS, "", "## Config", "", "```yaml", r["config_text"].rstrip(), "```", ""]
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------


def _series(r: dict, w: dict, key: str, stat: str | None) -> list[tuple[int, str, list, list]]:
    """(cluster index, name, loads, values) of each cluster with any value."""
    series = []
    for i, c in enumerate(r["clusters"]):
        points = [(v, metric(find_run(r, w["label"], c["name"], v), key, stat))
                  for v in w["values"]]
        points = [(v, y) for v, y in points if y is not None]
        if points:
            series.append((i, c["name"], [v for v, _ in points], [y for _, y in points]))
    return series


def _against_load(w: dict, key: str, stat: str | None, ylabel: str, title: str, log: bool):
    def panel(ax, r: dict) -> None:
        for i, name, xs, ys in _series(r, w, key, stat):
            ax.plot(xs, ys, "o-", color=f"C{i}", label=name)
        if key == "request_throughput" and w["load"] == "request_rate":
            ax.plot(w["values"], w["values"], "k:", linewidth=1, label="offered")
        ax.set(xlabel=LOAD_LABELS[w["load"]][1], ylabel=ylabel, title=title)
        if log:
            from matplotlib.ticker import ScalarFormatter

            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(ScalarFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return panel


def _cdf(w: dict, field: str, title: str):
    top = max(w["values"])

    def panel(ax, r: dict) -> None:
        for i, c in enumerate(r["clusters"]):
            run = find_run(r, w["label"], c["name"], top)
            records = [rec for rec in ((run or {}).get("results") or {}).get("requests", ())
                       if rec["error"] is None]
            values = sorted(v for rec in records
                            for v in (rec["itl_ms"] if field == "itl_ms" else [rec[field]])
                            if v is not None)
            if values:
                ax.step(values, [(k + 1) / len(values) for k in range(len(values))],
                        where="post", color=f"C{i}", label=c["name"])
        ax.set(xlabel=f"{title} (ms)", ylabel="share of " + ("gaps" if field == "itl_ms"
               else "requests"), title=f"{title} CDF at {_load_text(w['load'], top)} "
               + ("req/s" if w["load"] == "request_rate" else "in flight"), ylim=(0, 1.02))
        ax.legend(fontsize=8)
    return panel


def render_plots(r: dict, path: Path) -> bool:
    """path (the headline: the first workload's latency plot) and, next to it, each workload's
    <name>-<label>-latency.png and -cdf.png; False when no run has results."""
    if not any(run.get("results") for run in r["runs"]):
        return False
    title = f"{r['name']}: {{}} — {r['machine']['cpu_count']} CPU cores, one run"
    for k, w in enumerate(r["workloads"]):
        latency = [("ttft", _against_load(w, "ttft_ms", "p99", "ms", "TTFT p99", True)),
                   ("itl", _against_load(w, "itl_ms", "p99", "ms", "ITL p99", True)),
                   ("throughput", _against_load(w, "request_throughput", None, "requests/s",
                                                "Throughput", False))]
        cdfs = [("ttft", _cdf(w, "ttft_ms", "TTFT")), ("itl", _cdf(w, "itl_ms", "ITL"))]
        stem = path.parent / f"{r['name']}-{w['label']}"
        plot_panels(r, Path(f"{stem}-latency.png"), latency, title.format(w["label"]))
        plot_panels(r, Path(f"{stem}-cdf.png"), cdfs, title.format(w["label"]))
        if k == 0:
            shutil.copyfile(f"{stem}-latency.png", path)
    return True
