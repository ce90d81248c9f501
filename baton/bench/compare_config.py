"""The comparison benchmark's options: the YAML file, the flags, the entry point. Torch-free.

`baton bench compare` and `python benchmarks/compare.py` call add_compare_arguments on their
parser and main(args, command_line, check_cluster). check_cluster validates one `baton serve`
config (a parsed YAML mapping) and raises ValueError naming the key: the entry points pass
cluster.config.config_from_dict, since only the CLI may import the control plane. Every mistake
in the file is found here, before any cluster starts. The measuring code (baton.bench.compare) is
imported only once the file is valid.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.bench.options import run_benchmark
from baton.bench.serve_config import API_KEY_VARIABLES, ServeBenchConfig
from baton.bench.serve_report import SLO_METRICS
from baton.bench.serve_workloads import WORKLOADS

CheckCluster = Callable[[dict], object]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # file names and --only-clusters items
TOP_KEYS = ("name", "model", "clusters", "workloads", "startup_timeout_s", "warmup_requests")
EXTERNAL_KEYS = ("base_url", "model")
WORKLOAD_KEYS = ("workload", "label", "num_requests", "request_rates", "concurrency", "seed",
                 "max_output_tokens", "num_prefixes", "prefix_tokens", "endpoint", "ignore_eos",
                 "timeout_s", "goodput", "tokenizer")
# workload key -> (ServeBenchConfig field, type): copied as they are
BENCH_FIELDS = {"workload": ("workload", str), "num_requests": ("num_requests", int),
                "seed": ("seed", int), "max_output_tokens": ("max_output_tokens", int),
                "num_prefixes": ("num_prefixes", int), "prefix_tokens": ("prefix_tokens", int),
                "endpoint": ("endpoint", str), "ignore_eos": ("ignore_eos", bool),
                "timeout_s": ("timeout_s", float)}

DESCRIPTION = """\
Compare serving configurations under the same load: start each cluster of CONFIG.yaml in turn
(`baton serve` as a subprocess, stopped before the next one starts), send it every workload at
every request rate (or concurrency) with `baton bench serve`'s client, and report each cluster
against the first one. Also scrapes the cluster's Prometheus counters around every run.

CONFIG.yaml:

  name: disaggregation            # results: <out-dir>/<name>.md, .json, .png, <name>-*.png
  model: smollm2-135m-instruct    # default model of every started cluster
  startup_timeout_s: 900          # for each cluster's banner (default 900)
  warmup_requests: 2              # short chat requests before a cluster's first run (default 2)
  clusters:                       # in order; the first is the baseline of the ratios
    colocated:                    # a `baton serve` config (deploy/baton.example.yaml)
      prefill: {count: 0}
      decode: {count: 2, num_cpus: 1}
    disaggregated:
      prefill: {count: 1, num_cpus: 1}
      decode: {count: 1, num_cpus: 1}
    vllm: {base_url: "http://127.0.0.1:8001", model: my-model}  # a server already running
  workloads:
    - workload: long-prompt       # chat, shared-prefix, long-prompt, mixed or a ShareGPT file
      request_rates: [0.25, 0.5]  # Poisson arrivals per second; or concurrency: [1, 4]
      num_requests: 32
      seed: 0
      max_output_tokens: 128
      # also: label (default the workload's name), num_prefixes, prefix_tokens, endpoint,
      # ignore_eos, timeout_s, goodput: {ttft: MS, tpot: MS, e2el: MS}, tokenizer: DIR

A started cluster's router listens on free ports unless its config names them. At each load,
every cluster gets the same requests: the k-th load of a workload uses seed + k, so no run meets
the prompts of an earlier run in the prefix cache. Around every run compare reads the router's
GET /cluster and /metrics and every worker's /metrics, and reports the prefix-cache hit rate
(hits / queries, per worker role), the KV bytes transferred and the router's routing decisions
by mode during the run; a server without those endpoints gets nulls and a warning.

Writes <name>.json (every run's results, with each request's record), <name>.md (tables per
workload: throughput, TTFT, ITL, TPOT, E2E latency, prefix-cache hit rate, failures; and each
cluster's ratios to the first), <name>-<label>-latency.png (TTFT p99, ITL p99, throughput
against load), <name>-<label>-cdf.png (TTFT and ITL CDFs at the highest load) and <name>.png
(the first workload's latency plot). --only-clusters writes only where --out-dir says. An API
key for the servers comes from $BATON_API_KEY, else $OPENAI_API_KEY. Exit code 1 when a cluster
did not start or a run failed entirely (the results are written all the same), 2 for a bad
config, 130 on Ctrl-C (every started cluster is stopped)."""


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    serve_config: dict | None = None  # a validated `baton serve` config; None = external server
    base_url: str | None = None  # an already running server (not started, not stopped)
    model: str | None = None  # external: the model to ask for; None = the first of /v1/models

    @property
    def started(self) -> bool:
        return self.serve_config is not None


@dataclass(frozen=True)
class WorkloadSpec:
    label: str
    load: str  # "request_rate" or "concurrency"
    values: tuple[float, ...]  # request rates (> 0, finite) or concurrencies (whole, > 0)
    bench: ServeBenchConfig  # every setting but the server, the load and the seed's offset

    def run_config(self, index: int, base_url: str, model: str | None,
                   api_key: str | None) -> ServeBenchConfig:
        """The index-th load's benchmark against base_url, with seed + index."""
        value = self.values[index]
        load = ({"concurrency": int(value)} if self.load == "concurrency"
                else {"request_rate": value})
        return dataclasses.replace(self.bench, base_url=base_url, model=model, api_key=api_key,
                                   seed=self.bench.seed + index, **load)


@dataclass(frozen=True)
class CompareConfig:
    name: str
    clusters: tuple[ClusterSpec, ...]
    workloads: tuple[WorkloadSpec, ...]
    text: str = ""  # the YAML as written
    path: Path | None = None
    startup_timeout_s: float = 900.0
    stop_timeout_s: float = 120.0  # after SIGTERM, then the process group is killed
    warmup_requests: int = 2
    api_key: str | None = None
    out_dir: Path | None = None  # None = print the report only
    command: str = ""

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        if not self.clusters or not self.workloads:
            raise ValueError("a comparison needs at least one cluster and one workload")
        for key in ("startup_timeout_s", "stop_timeout_s"):
            if not 0 < getattr(self, key) < math.inf:
                raise ValueError(f"{key} must be > 0 and finite, got {getattr(self, key)}")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests must be >= 0, got {self.warmup_requests}")


def _typed(value: Any, tp: type, key: str) -> Any:
    """value as tp (an int is a float too; a bool is neither), or ValueError naming key."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
             dict: "a mapping", list: "a list"}
    raise ValueError(f"{key} must be {names[tp]}, got {value!r}")


def _check_keys(raw: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [str(k) for k in raw if k not in allowed]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown key {key!r}; valid keys there: {', '.join(allowed)}")


def _cluster(name: Any, raw: Any, model: str | None, check_cluster: CheckCluster) -> ClusterSpec:
    key = f"clusters.{name}"
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"cluster names must be letters, digits, '.', '_' or '-', got {name!r}")
    raw = {} if raw is None else _typed(raw, dict, key)
    if "base_url" in raw:
        _check_keys(raw, EXTERNAL_KEYS, key)
        url = _typed(raw["base_url"], str, f"{key}.base_url")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{key}.base_url must start with http:// or https://, got {url!r}")
        served = raw.get("model")
        return ClusterSpec(name, base_url=url.rstrip("/"),
                           model=None if served is None else _typed(served, str, f"{key}.model"))
    config = copy.deepcopy(raw)
    if model is not None:
        config.setdefault("model", model)
    if config.get("router") is None:
        config["router"] = {}
    router = _typed(config["router"], dict, f"{key}.router")
    router.setdefault("http_port", 0)  # any free port: the banner says which
    router.setdefault("grpc_port", 0)
    try:
        check_cluster(config)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return ClusterSpec(name, serve_config=config)


def _goodput(raw: Any, key: str) -> tuple[tuple[str, float], ...]:
    slos = []
    for name, limit in _typed(raw, dict, key).items():
        if name not in SLO_METRICS:
            raise ValueError(f"{key} keys must be among {', '.join(SLO_METRICS)}, got {name!r}")
        slos.append((name, _typed(limit, float, f"{key}.{name}")))
    return tuple(slos)


def _load(raw: dict, key: str) -> tuple[str, tuple[float, ...]]:
    given = [k for k in ("request_rates", "concurrency") if k in raw]
    if len(given) != 1:
        raise ValueError(f"{key} needs request_rates or concurrency (a list), exactly one of them")
    load = given[0]
    values = _typed(raw[load], list, f"{key}.{load}")
    if not values:
        raise ValueError(f"{key}.{load} must not be empty")
    checked = []
    for i, value in enumerate(values):
        where = f"{key}.{load}[{i}]"
        if load == "concurrency":
            if _typed(value, int, where) <= 0:
                raise ValueError(f"{where} must be > 0, got {value}")
        elif not 0 < _typed(value, float, where) < math.inf:
            raise ValueError(f"{where} must be a request rate > 0 and finite (requests per "
                             f"second; for all at once, use concurrency), got {value!r}")
        checked.append(float(value))
    if len(set(checked)) != len(checked):
        raise ValueError(f"{key}.{load} names a value twice: {values}")
    return ("request_rate" if load == "request_rates" else "concurrency"), tuple(checked)


def _workload(index: int, raw: Any) -> WorkloadSpec:
    key = f"workloads[{index}]"
    raw = _typed(raw, dict, key)
    _check_keys(raw, WORKLOAD_KEYS, key)
    if "workload" not in raw:
        raise ValueError(f"{key} needs workload: one of {', '.join(WORKLOADS)} or a ShareGPT file")
    fields: dict[str, Any] = {"progress": True}
    for name, (field, tp) in BENCH_FIELDS.items():
        if name in raw:
            fields[field] = _typed(raw[name], tp, f"{key}.{name}")
    if "goodput" in raw:
        fields["goodput_slos_ms"] = _goodput(raw["goodput"], f"{key}.goodput")
    if "tokenizer" in raw:
        fields["tokenizer"] = Path(_typed(raw["tokenizer"], str, f"{key}.tokenizer"))
    load, values = _load(raw, key)
    workload = fields["workload"]
    label = raw.get("label", workload if workload in WORKLOADS else Path(workload).stem)
    if not isinstance(label, str) or not NAME_RE.match(label):
        raise ValueError(f"{key}.label must be letters, digits, '.', '_' or '-' (it names the "
                         f"plot files), got {label!r}")
    try:
        bench = ServeBenchConfig(**fields)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return WorkloadSpec(label, load, values, bench)


def load_compare_config(path: Path, check_cluster: CheckCluster, **settings: Any) -> CompareConfig:
    """Read and validate CONFIG.yaml; settings are CompareConfig's other fields (out_dir, ...).
    Raises ValueError naming the file and the key."""
    import yaml

    try:
        text = Path(path).read_text()
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise ValueError(f"cannot read the config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    try:
        return _parse(raw, text, Path(path), check_cluster, settings)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _parse(raw: Any, text: str, path: Path, check_cluster: CheckCluster,
           settings: dict) -> CompareConfig:
    _typed(raw, dict, "the file")
    _check_keys(raw, TOP_KEYS, "")
    model = None if raw.get("model") is None else _typed(raw["model"], str, "model")
    clusters = raw.get("clusters")
    if not isinstance(clusters, dict) or not clusters:
        raise ValueError("clusters must map at least one name to a `baton serve` config or "
                         "{base_url: URL}")
    workloads = raw.get("workloads")
    if not isinstance(workloads, list) or not workloads:
        raise ValueError("workloads must be a list of at least one workload")
    specs = tuple(_cluster(name, entry, model, check_cluster) for name, entry in clusters.items())
    loads = tuple(_workload(i, entry) for i, entry in enumerate(workloads))
    labels = [w.label for w in loads]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"two workloads are labelled {twice[0]!r}; give each its own label")
    only = settings.pop("only_clusters", None)
    if only:
        unknown = [name for name in only if name not in clusters]
        if unknown:
            raise ValueError(f"--only-clusters names {unknown[0]!r}, which is not among the "
                             f"clusters: {', '.join(clusters)}")
        specs = tuple(next(s for s in specs if s.name == name) for name in only)
    numbers = {"startup_timeout_s": float, "warmup_requests": int}
    settings.update({k: _typed(raw[k], tp, k) for k, tp in numbers.items() if k in raw})
    return CompareConfig(name=str(raw.get("name", path.stem)), clusters=specs, workloads=loads,
                         text=text, path=path, **settings)


def cluster_names(text: str) -> tuple[str, ...]:
    """The type of --only-clusters: a, b, ... (names are checked against the file later)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct cluster names separated by commas, "
                                         f"got {text!r}")
    return names


def add_compare_arguments(parser: argparse.ArgumentParser, default_out_dir: Path) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument("config", type=Path, metavar="CONFIG.yaml",
                        help="the comparison: clusters and workloads (format above; "
                        "benchmarks/serving.yaml and benchmarks/routing.yaml are examples)")
    parser.add_argument("--out-dir", type=Path, metavar="DIR",
                        help=f"where the results go (default {default_out_dir}; with "
                        "--only-clusters nothing is written unless this is given)")
    parser.add_argument("--only-clusters", type=cluster_names, metavar="A,B",
                        help="run only these clusters of the file, in this order (the first is "
                        "the baseline)")
    parser.set_defaults(default_out_dir=default_out_dir)


def config_from_args(args: argparse.Namespace, command_line: str,
                     check_cluster: CheckCluster) -> CompareConfig:
    import os

    api_key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
    out_dir = args.out_dir or (None if args.only_clusters else args.default_out_dir)
    config = load_compare_config(args.config, check_cluster, out_dir=out_dir, api_key=api_key,
                                 command=command_line, only_clusters=args.only_clusters)
    check_out_dir(config)
    return config


def check_out_dir(config: CompareConfig) -> None:
    """Refuse to overwrite a <name>.md that is not an earlier comparison's report (such as the
    hand-written docs/benchmarks/serving.md)."""
    from baton.bench.compare_report import TITLE

    if config.out_dir is None:
        return
    report = Path(config.out_dir) / f"{config.name}.md"
    if report.is_file() and not report.read_text().startswith(TITLE):
        raise ValueError(f"{report} exists and is not a comparison's report; name the results "
                         "otherwise (the config's name) or pick another --out-dir")


def main(args: argparse.Namespace, command_line: str, check_cluster: CheckCluster) -> int:
    """Run the comparison from parsed arguments; exit code 0, 1 (a cluster or a run failed) or
    2 (a bad config)."""

    def load_run():
        from baton.bench.compare import run

        return run

    return run_benchmark("compare",
                         lambda: config_from_args(args, command_line, check_cluster), load_run)
