"""`baton bench compare` without servers: the YAML's validation and its errors, the counters'
scrape and difference math on hand-written Prometheus text (and a mock transport), the tables
and ratios of the report, and its plots, from synthetic results."""

from __future__ import annotations

import asyncio
import copy
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from baton import cli
from baton.bench import compare_metrics as cm
from baton.bench.compare_config import check_out_dir, load_compare_config
from baton.bench.compare_report import ratios, render_markdown, render_plots
from cluster.config import config_from_dict

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]

VALID = """\
name: demo
model: my-model
clusters:
  colocated: {prefill: {count: 0}, decode: {count: 2, num_cpus: 1}}
  disaggregated: {prefill: {count: 1}, decode: {count: 1}, router: {http_port: 8123}}
  other: {base_url: "http://127.0.0.1:9/", model: theirs}
workloads:
  - {workload: long-prompt, num_requests: 24, request_rates: [0.1, 0.2, 0.4], seed: 5,
     max_output_tokens: 64}
  - {workload: shared-prefix, label: prefixes, concurrency: [1, 4], num_prefixes: 8,
     prefix_tokens: 1000, goodput: {ttft: 500}, ignore_eos: false}
"""


def load(tmp_path: Path, text: str, **settings):
    path = tmp_path / "compare.yaml"
    path.write_text(text)
    return load_compare_config(path, config_from_dict, **settings)


# ---- the config file ---------------------------------------------------------------------------


def test_a_valid_config(tmp_path):
    c = load(tmp_path, VALID)
    assert c.name == "demo" and [s.name for s in c.clusters] == ["colocated", "disaggregated",
                                                                 "other"]
    colocated, disaggregated, other = c.clusters
    assert colocated.serve_config == {
        "prefill": {"count": 0}, "decode": {"count": 2, "num_cpus": 1}, "model": "my-model",
        "router": {"http_port": 0, "grpc_port": 0}}
    assert disaggregated.serve_config["router"] == {"http_port": 8123, "grpc_port": 0}
    assert (other.started, other.base_url, other.model) == (False, "http://127.0.0.1:9", "theirs")
    long, shared = c.workloads
    assert (long.label, long.load, long.values) == ("long-prompt", "request_rate", (0.1, 0.2, 0.4))
    third = long.run_config(2, "http://h:1", "m", "key")
    assert (third.request_rate, third.concurrency, third.seed) == (0.4, None, 7)
    assert (third.base_url, third.model, third.api_key, third.num_requests) == ("http://h:1", "m",
                                                                                "key", 24)
    assert third.max_output_tokens == 64
    assert (shared.label, shared.load) == ("prefixes", "concurrency")
    second = shared.run_config(1, "http://h:1", None, None)
    assert (second.concurrency, second.request_rate, second.seed) == (4, math.inf, 1)
    assert (second.num_prefixes, second.prefix_tokens, second.ignore_eos) == (8, 1000, False)
    assert second.goodput_slos_ms == (("ttft", 500.0),)
    only = load(tmp_path, VALID, only_clusters=("other", "colocated"))
    assert [s.name for s in only.clusters] == ["other", "colocated"]


def test_the_shipped_configs_are_valid():
    serving = load_compare_config(REPO / "benchmarks" / "serving.yaml", config_from_dict)
    assert [s.name for s in serving.clusters] == ["colocated", "disaggregated"]
    routing = load_compare_config(REPO / "benchmarks" / "routing.yaml", config_from_dict)
    policies = [config_from_dict(s.serve_config).router.routing_policy for s in routing.clusters]
    assert policies == ["kv_aware", "round_robin"]
    for spec in routing.clusters:
        cluster = config_from_dict(spec.serve_config)
        assert (cluster.prefill.count, cluster.decode.count) == (0, 2)
        assert cluster.decode.engine.kv_cache_memory_bytes == 200 << 20
    (workload,) = routing.workloads
    bench = workload.run_config(0, "http://h:1", None, None)
    assert (bench.workload, bench.num_prefixes, bench.prefix_tokens, bench.num_requests,
            bench.concurrency, bench.max_output_tokens) == ("shared-prefix", 8, 1000, 64, 4, 16)


def edited(**changes) -> str:
    """VALID with top-level keys replaced (None removes one), as YAML."""
    import yaml

    raw = yaml.safe_load(VALID)
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    return yaml.safe_dump(raw)


def workload(**fields) -> str:
    return edited(workloads=[{"workload": "chat", "request_rates": [1.0], **fields}])


@pytest.mark.parametrize("text, message", [
    (edited(colour="blue"), "unknown key 'colour'; valid keys there: name, model, clusters"),
    (edited(clusters={}), "clusters must map at least one name"),
    (edited(clusters=None), "clusters must map at least one name"),
    (edited(workloads=[]), "workloads must be a list of at least one workload"),
    (edited(name="my results"), "name must be letters, digits"),
    (edited(clusters={"a": {"decode": {"cont": 2}}}),
     "clusters.a: unknown config key 'decode.cont'"),
    (edited(clusters={"a": {"decode": {"count": 0}}}), "clusters.a: decode.count must be >= 1"),
    (edited(clusters={"a": {"router": {"routing_policy": "random"}}}), "clusters.a: router."),
    (edited(clusters={"a": {"base_url": "127.0.0.1:8000"}}),
     "clusters.a.base_url must start with http://"),
    (edited(clusters={"a": {"base_url": "http://h:1", "decode": {}}}),
     "unknown key 'clusters.a.decode'; valid keys there: base_url, model"),
    (edited(clusters={"a b": {}}), "cluster names must be letters"),
    (edited(startup_timeout_s=0), "startup_timeout_s must be > 0"),
    (workload(request_rates=[0.5, 0]),
     r"workloads\[0\].request_rates\[1\] must be a request rate > 0"),
    (workload(request_rates=["fast"]), r"workloads\[0\].request_rates\[0\] must be a number"),
    (workload(request_rates=[float("inf")]), "for all at once, use concurrency"),
    (workload(request_rates=[]), r"workloads\[0\].request_rates must not be empty"),
    (workload(request_rates=0.5), r"workloads\[0\].request_rates must be a list"),
    (workload(request_rates=[1, 1.0]), "names a value twice"),
    (workload(concurrency=[2]),
     r"needs request_rates or concurrency \(a list\), exactly one of them"),
    (edited(workloads=[{"workload": "chat"}]), "exactly one of them"),
    (edited(workloads=[{"workload": "chat", "concurrency": [1.5]}]),
     r"workloads\[0\].concurrency\[0\] must be a whole number"),
    (edited(workloads=[{"workload": "chat", "concurrency": [0]}]),
     r"workloads\[0\].concurrency\[0\] must be > 0"),
    (edited(workloads=[{"request_rates": [1]}]), r"workloads\[0\] needs workload: one of chat"),
    (workload(workload="chatty"), r"workloads\[0\]: workload must be one of chat"),
    (workload(num_requests=0), r"workloads\[0\]: num_requests must be > 0"),
    (workload(num_requests=True), r"workloads\[0\].num_requests must be a whole number"),
    (workload(num_prefixes=0), r"workloads\[0\]: num_prefixes must be > 0"),
    (workload(rates=[1]), r"unknown key 'workloads\[0\].rates'; valid keys there: workload"),
    (workload(goodput={"itl": 5}), r"workloads\[0\].goodput keys must be among ttft, tpot, e2el"),
    (edited(workloads=[{"workload": "chat", "concurrency": [1]},
                       {"workload": "chat", "concurrency": [2]}]),
     "two workloads are labelled 'chat'"),
    ("- just\n- a list\n", "the file must be a mapping"),
    ("clusters: [\n", "is not valid YAML"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as info:
        load(tmp_path, text)
    assert str(info.value).startswith(str(tmp_path / "compare.yaml"))


def test_only_clusters_must_exist(tmp_path):
    with pytest.raises(ValueError, match="--only-clusters names 'solo', which is not among the "
                                         "clusters: colocated, disaggregated, other"):
        load(tmp_path, VALID, only_clusters=("solo",))


# ---- the counters ------------------------------------------------------------------------------

WORKER = """\
# HELP baton_prefix_cache_queries Prompt tokens looked up in the prefix cache.
# TYPE baton_prefix_cache_queries counter
baton_prefix_cache_queries_total{{model="m",role="{role}",worker="{id}"}} {queries}
# TYPE baton_prefix_cache_hits counter
baton_prefix_cache_hits_total{{model="m",role="{role}",worker="{id}"}} {hits}
# TYPE baton_kv_transfer_bytes counter
baton_kv_transfer_bytes_total{{model="m",role="{role}",worker="{id}"}} {kv}
baton_kv_transfer_bytes_created{{model="m",role="{role}",worker="{id}"}} 1.7e9
# TYPE baton_num_requests_running gauge
baton_num_requests_running{{model="m",role="{role}",worker="{id}"}} 3
"""
ROUTER = """\
# TYPE baton_routing_decisions counter
baton_routing_decisions_total{{model="m",mode="local",reason="short"}} {short}
baton_routing_decisions_total{{model="m",mode="local",reason="no_prefill"}} {no_prefill}
baton_routing_decisions_total{{model="m",mode="remote",reason="cost"}} {remote}
baton_routing_decisions_created{{model="m",mode="remote",reason="cost"}} 1.7e9
"""


def worker_text(role: str, id: str, queries: float, hits: float, kv: float) -> str:
    return WORKER.format(role=role, id=id, queries=queries, hits=hits, kv=kv)


def test_counter_sums():
    text = worker_text("decode", "d0", 100, 40, 2048) + ROUTER.format(short=2, no_prefill=3,
                                                                       remote=7)
    assert cm.counter_sums(text, (cm.QUERIES, cm.KV_BYTES, "baton_absent_total")) == {
        cm.QUERIES: {"": 100.0}, cm.KV_BYTES: {"": 2048.0}, "baton_absent_total": {}}
    assert cm.counter_sums(text, (cm.ROUTING,), by="mode") == {
        cm.ROUTING: {"local": 5.0, "remote": 7.0}}
    with pytest.raises(ValueError):
        cm.counter_sums("baton_x{oops 1\n", (cm.QUERIES,))


def counters(queries: float, hits: float, kv: float) -> dict[str, float]:
    return {cm.QUERIES: queries, cm.HITS: hits, cm.KV_BYTES: kv}


def test_deltas_per_role_with_a_reset_and_a_new_worker():
    before = cm.Snapshot(
        workers={"d0": ("decode", counters(100, 40, 1000)), "d1": ("decode", counters(50, 0, 0)),
                 "p0": ("prefill", counters(10, 0, 5000)), "gone": ("decode", counters(1, 1, 1))},
        routing={"local": 4.0}, warnings=["a warning"])
    after = cm.Snapshot(
        workers={"d0": ("decode", counters(300, 140, 3000)), "d1": ("decode", counters(20, 10, 0)),
                 "p0": ("prefill", counters(10, 0, 5000)), "new": ("decode", counters(9, 9, 9))},
        routing={"local": 6.0, "remote": 3.0}, warnings=["a warning"])
    d = cm.run_deltas(before, after)
    # d1 restarted: its counters start again from 0, so its difference is its new value
    assert d["prefix_cache"] == {"decode": {"queries": 220.0, "hits": 110.0, "hit_rate": 0.5},
                                 "prefill": {"queries": 0.0, "hits": 0.0, "hit_rate": None}}
    assert d["kv_transfer_bytes"] == {"decode": 2000.0, "prefill": 0.0}
    assert d["routing_decisions"] == {"local": 2.0, "remote": 3.0}
    assert d["warnings"] == ["a warning", "workers not in both scrapes, left out: gone, new"]


def test_deltas_without_scrapes_are_null():
    d = cm.run_deltas(cm.Snapshot(warnings=["no worker metrics: x"]), cm.Snapshot())
    assert d == {"prefix_cache": None, "kv_transfer_bytes": None, "routing_decisions": None,
                 "warnings": ["no worker metrics: x"]}


def fake_cluster(state: dict) -> httpx.MockTransport:
    """A router at http://router with workers d0 (decode) and p0 (prefill), whose counters are
    state's; state["down"] names a worker that does not answer."""

    def handle(request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url == "http://router/cluster":
            return httpx.Response(200, json={"workers": [
                {"id": "d0", "role": "decode", "metrics_url": "http://d0/metrics"},
                {"id": "p0", "role": "prefill", "metrics_url": "http://p0/metrics"}]})
        if url == "http://router/metrics":
            return httpx.Response(200, text=ROUTER.format(**state["router"]))
        for worker, role in (("d0", "decode"), ("p0", "prefill")):
            if url == f"http://{worker}/metrics":
                if state.get("down") == worker:
                    raise httpx.ConnectError("connection refused")
                return httpx.Response(200, text=worker_text(role, worker, *state[worker]))
        return httpx.Response(404, json={"error": {"message": "no route"}})

    return httpx.MockTransport(handle)


def scrape(transport: httpx.MockTransport, base_url: str = "http://router") -> cm.Snapshot:
    async def go() -> cm.Snapshot:
        async with httpx.AsyncClient(transport=transport) as client:
            return await cm.snapshot(client, base_url)

    return asyncio.run(go())


def test_snapshots_of_a_cluster():
    state = {"router": {"short": 1, "no_prefill": 0, "remote": 2},
             "d0": (100, 25, 4096), "p0": (100, 0, 4096)}
    transport = fake_cluster(state)
    before = scrape(transport)
    assert before.workers == {"d0": ("decode", counters(100, 25, 4096)),
                              "p0": ("prefill", counters(100, 0, 4096))}
    assert before.routing == {"local": 1.0, "remote": 2.0} and before.warnings == []
    state.update(router={"short": 1, "no_prefill": 0, "remote": 6}, d0=(500, 325, 8192),
                 p0=(500, 100, 8192))
    d = cm.run_deltas(before, scrape(transport))
    assert d["prefix_cache"]["decode"]["hit_rate"] == 0.75
    assert d["prefix_cache"]["prefill"]["hit_rate"] == 0.25
    assert d["kv_transfer_bytes"] == {"decode": 4096.0, "prefill": 4096.0}
    assert d["routing_decisions"] == {"local": 0.0, "remote": 4.0}
    # a worker that does not answer is left out, with a warning; the run goes on
    state["down"] = "p0"
    down = scrape(transport)
    assert set(down.workers) == {"d0"}
    assert down.warnings[0].startswith("worker p0 left out: GET http://p0/metrics failed")


def test_a_server_without_cluster_endpoints_gets_nulls_and_warnings():
    snapshot = scrape(fake_cluster({}), base_url="http://elsewhere")
    assert snapshot.workers is None and snapshot.routing is None
    assert sorted(snapshot.warnings) == [
        "no routing decisions: GET http://elsewhere/metrics answered HTTP 404",
        "no worker metrics: GET http://elsewhere/cluster answered HTTP 404"]


# ---- the report --------------------------------------------------------------------------------


def serve_results(ttft_ms: float, itl_ms: float, throughput: float, failed: int = 0) -> dict:
    stats = lambda v: {"mean": v, "median": v, "p90": v * 1.5, "p99": v * 2}
    records = [{"index": i, "error": None, "ttft_ms": ttft_ms * (1 + i / 10),
                "itl_ms": [itl_ms, itl_ms * 2], "latency_ms": 1000.0} for i in range(4)]
    return {"model": "m", "num_completed": 4, "num_failed": failed, "duration_s": 10.0,
            "request_throughput": throughput, "output_token_throughput": throughput * 10,
            "ttft_ms": stats(ttft_ms), "itl_ms": stats(itl_ms), "tpot_ms": stats(itl_ms),
            "e2e_ms": stats(1000.0), "requests": records}


def synthetic() -> dict:
    def run(cluster, value, ttft, itl, tput, hit=None, kv=None, routing=None):
        server = {"prefix_cache": None if hit is None else {"decode": {"hit_rate": hit}},
                  "kv_transfer_bytes": kv, "routing_decisions": routing, "warnings": []}
        return {"cluster": cluster, "workload": "long-prompt", "load_value": value, "seed": 0,
                "error": None, "results": serve_results(ttft, itl, tput), "server_metrics": server}

    return {
        "name": "demo", "command": "baton bench compare demo.yaml", "config_text": "name: demo\n",
        "duration_s": 600.0,
        "machine": {"cpu_count": 2, "processor": "x86_64", "python": "3.11.2",
                    "load_average_1m": [0.5, 1.5]},
        "clusters": [
            {"name": "colocated", "started": True, "base_url": "http://a", "startup_s": 30.0,
             "workers": {"decode": 2}, "error": None},
            {"name": "disaggregated", "started": True, "base_url": "http://b", "startup_s": 40.0,
             "workers": {"decode": 1, "prefill": 1}, "error": None},
            {"name": "broken", "started": True, "base_url": None, "startup_s": None,
             "workers": None, "error": "baton serve exited with code 1\nthe tail"}],
        "workloads": [{"label": "long-prompt", "workload": "long-prompt", "load": "request_rate",
                       "values": [0.5, 1.0], "num_requests": 4, "seed": 0,
                       "max_output_tokens": 64, "num_prefixes": 4, "prefix_tokens": 1024}],
        "runs": [
            run("colocated", 0.5, 200.0, 50.0, 0.5, hit=0.25, kv={"decode": 0.0},
                routing={"local": 4.0}),
            run("colocated", 1.0, 400.0, 100.0, 0.8, hit=0.5, kv={"decode": 0.0},
                routing={"local": 4.0}),
            run("disaggregated", 0.5, 100.0, 25.0, 0.5, hit=0.0, kv={"decode": 3 * 2**20},
                routing={"remote": 3.0, "local": 1.0}),
            {"cluster": "disaggregated", "workload": "long-prompt", "load_value": 1.0, "seed": 1,
             "error": "cannot reach the server", "results": None, "server_metrics": None},
        ],
    }


def test_ratios_to_the_first_cluster():
    rows = ratios(synthetic(), "long-prompt")
    assert rows[0] == {"cluster": "disaggregated", "load_value": 0.5, "TTFT p50": 0.5,
                       "TTFT p99": 0.5, "ITL p99": 0.5, "output tok/s": 1.0}
    assert rows[1]["load_value"] == 1.0 and rows[1]["TTFT p50"] is None  # its run failed
    assert len(rows) == 2  # none for the cluster that did not start


def test_markdown_tables():
    md = render_markdown(synthetic())
    assert md.startswith("# Serving comparison: demo")
    assert "`baton bench compare demo.yaml`" in md and "2 CPU cores, x86_64" in md
    assert "| colocated | `baton serve`: 0 prefill + 2 decode workers | m | 30 |" in md
    assert "| disaggregated | `baton serve`: 1 prefill + 1 decode workers | m | 40 |" in md
    assert "| broken | **did not start**: baton serve exited with code 1 | - | - |" in md
    # cluster, rate, req/s, output tok/s, TTFT p50/p99, ITL p50/p99, TPOT p50, E2E p50, hit, failed
    assert "| colocated | 0.5 | 0.50 | 5.0 | 200 | 400 | 50 | 100 | 50 | 1000 | 0.25 | 0 |" in md
    assert "| disaggregated | 1 | - | - | - | - | - | - | - | - | - | run failed |" in md
    assert "| disaggregated | 0.5 | 0.50 | 0.50 | 0.50 | 1.00 |" in md  # the ratios
    assert "| disaggregated | 0.5 | 0.00 | - | 3.0 | 1 / 3 |" in md  # the counters
    assert "| colocated | 1 | 0.50 | - | 0.0 | 4 / 0 |" in md
    assert "![TTFT p99, ITL p99 and throughput against load](demo-long-prompt-latency.png)" in md
    assert md.rstrip().endswith("```yaml\nname: demo\n```")


def test_plots_are_written(tmp_path):
    assert render_plots(synthetic(), tmp_path / "demo.png")
    for name in ("demo.png", "demo-long-prompt-latency.png", "demo-long-prompt-cdf.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    nothing = copy.deepcopy(synthetic())
    nothing["runs"] = [dict(run, results=None) for run in nothing["runs"]]
    assert not render_plots(nothing, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# ---- the command line --------------------------------------------------------------------------


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "compare", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for word in ("CONFIG.yaml", "--out-dir", "--only-clusters", "clusters:", "workloads:",
                 "request_rates", "concurrency", "base_url", "num_prefixes", "prefix_tokens",
                 "startup_timeout_s", "warmup_requests", "seed + k", "prefix-cache hit rate",
                 "-latency.png", "-cdf.png", "BATON_API_KEY"):
        assert word in out, word


def test_a_bad_config_is_exit_code_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(workload(request_rates=[-1]))
    assert cli.main(["bench", "compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: workloads[0].request_rates[0] must be a request rate > 0" in err
    assert cli.main(["bench", "compare", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read the config file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "compare", str(path), "--only-clusters", "a,a"])
    assert "expected distinct cluster names" in capsys.readouterr().err


def test_help_stays_light():
    code = ("import sys\nfrom baton import cli\ntry:\n"
            "    cli.main(['bench', 'compare', '--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'ray', 'cluster', 'httpx', 'yaml', 'matplotlib', "
            "'prometheus_client', 'baton.bench.compare') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_arguments_become_the_config(monkeypatch, tmp_path):
    configs = []
    monkeypatch.setitem(sys.modules, "baton.bench.compare",
                        type("StandIn", (), {"run": staticmethod(configs.append)}))
    monkeypatch.setenv("BATON_API_KEY", "s3cret")
    path = tmp_path / "demo.yaml"
    path.write_text(VALID)
    assert cli.main(["bench", "compare", str(path)]) == 0
    assert cli.main(["bench", "compare", str(path),
                     "--only-clusters", "disaggregated,colocated"]) == 0
    out = tmp_path / "out"
    assert cli.main(["bench", "compare", str(path), "--only-clusters", "other",
                     "--out-dir", str(out)]) == 0
    full, partial, kept = configs
    assert full.out_dir == Path("docs") / "benchmarks" and full.api_key == "s3cret"
    assert full.command == f"baton bench compare {path}" and full.text == VALID
    assert [s.name for s in partial.clusters] == ["disaggregated", "colocated"]
    assert partial.out_dir is None  # a partial run never overwrites the full run's results
    assert kept.out_dir == out


def test_a_page_that_is_no_report_is_never_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "baton.bench.compare",
                        type("StandIn", (), {"run": staticmethod(lambda config: None)}))
    path = tmp_path / "demo.yaml"
    path.write_text(VALID)
    out = tmp_path / "out"
    out.mkdir()
    (out / "demo.md").write_text("# Serving benchmark\n\nhand-written\n")
    assert cli.main(["bench", "compare", str(path), "--out-dir", str(out)]) == 2
    assert f"{out / 'demo.md'} exists and is not a comparison's report" in capsys.readouterr().err
    (out / "demo.md").write_text(render_markdown(synthetic()))  # an earlier run's: replaced
    assert cli.main(["bench", "compare", str(path), "--out-dir", str(out)]) == 0
    # the shipped config does not write over the hand-written serving page
    for name in ("serving", "routing"):
        config = load_compare_config(REPO / "benchmarks" / f"{name}.yaml", config_from_dict,
                                     out_dir=REPO / "docs" / "benchmarks")
        check_out_dir(config)
