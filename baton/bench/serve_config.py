"""The serving benchmark's options: flags, a frozen config, and the entry point. Torch-free.

`baton bench serve` calls add_serve_arguments on its parser and main(args, command_line); the
client (baton.bench.serve) is imported only once the arguments are valid. Environment variables
(the API key) are read here, at the entry point, never by the client.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

from baton.bench.options import count, run_benchmark
from baton.bench.serve_report import SLO_METRICS
from baton.bench.serve_workloads import NUM_SHARED_PREFIXES, SHARED_PREFIX_LEN, WORKLOADS

DEFAULT_URL = "http://127.0.0.1:8000"
ENDPOINTS = ("chat", "completions")
API_KEY_VARIABLES = ("BATON_API_KEY", "OPENAI_API_KEY")

DESCRIPTION = """\
Benchmark a running OpenAI-compatible server (a Baton router, vLLM, SGLang, ...) as a client:
send --num-requests streaming requests of a workload and report request and token throughput,
time to first token (TTFT), time per output token (TPOT), inter-token latency (ITL) and end-to-end
latency (E2E) - mean, median, p90, p99 in ms - and the goodput under --goodput's SLOs.

Load: --request-rate R sends requests at Poisson arrivals of R per second drawn from the seed
(inf, the default, sends them all at once); --concurrency C instead keeps C requests in flight,
sending the next as soon as one finishes.

Workloads (lengths in tokens, ranges inclusive and uniform; a prompt of n tokens is n common
English words, each one token in SmolLM2's vocabulary; --tokenizer makes the counts exact):

  chat           prompt 32..512, output 16..256
  shared-prefix  --num-prefixes system prompts (default 4) of --prefix-tokens (default 1024),
                 each the start of the same number of requests in a seeded random order, then
                 a question of 16..64; output 32..128
  long-prompt    every 4th request a prompt of 1800..2200 with output 8..32, the others a prompt
                 of 16..64 with output 256..512 (long prompts arriving among ongoing decodes)
  mixed          each request one of those four kinds at random
  FILE           a ShareGPT file, JSON lines of {"conversations": [{"from": "human", "value":
                 ...}, {"from": "gpt", "value": ...}]}: the prompt is the first human turn,
                 max_tokens the length of its gpt answer (4 characters a token)

Every request streams (stream_options.include_usage) at temperature 0 with max_tokens and
ignore_eos (vLLM's extension, which Baton accepts), so a request generates max_tokens tokens.

Definitions are vLLM's: TTFT ends at the first chunk carrying content; ITL is every gap between
successive content chunks; TPOT = (E2E - TTFT) / (output tokens - 1) per request; output tokens
are the server's usage, else the number of content chunks. Failed requests are counted and the
first error printed; they enter no latency. The table goes to stdout, progress to stderr, and
--out FILE gets everything as JSON, with one record per request. Exit code 1 when every request
failed."""


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = DEFAULT_URL
    workload: str = "chat"  # one of WORKLOADS or a ShareGPT file
    num_requests: int = 100
    request_rate: float = math.inf  # Poisson arrivals per second; inf = all at once
    concurrency: int | None = None  # closed loop with this many in flight (request_rate unused)
    seed: int = 0
    goodput_slos_ms: tuple[tuple[str, float], ...] = ()  # (metric of SLO_METRICS, limit in ms)
    model: str | None = None  # None = the first of GET /v1/models
    api_key: str | None = None
    endpoint: str = "chat"
    tokenizer: Path | None = None  # an HF directory with tokenizer.json, for exact token counts
    max_output_tokens: int = 1024  # cap on every request's max_tokens
    num_prefixes: int = NUM_SHARED_PREFIXES  # shared-prefix: distinct system prompts
    prefix_tokens: int = SHARED_PREFIX_LEN  # shared-prefix: tokens of each system prompt
    ignore_eos: bool = True
    timeout_s: float = 600.0  # per request
    out: Path | None = None  # the JSON results; None = the table only
    progress: bool = True  # a progress line on stderr
    command: str = ""  # the command line, recorded in the results (the API key masked)

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS and not Path(self.workload).is_file():
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)} or a ShareGPT "
                             f"JSONL file; {self.workload!r} is neither")
        if self.num_requests <= 0:
            raise ValueError(f"num_requests must be > 0, got {self.num_requests}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf = all at once), got {self.request_rate}")
        if self.concurrency is not None and self.concurrency <= 0:
            raise ValueError(f"concurrency must be > 0, got {self.concurrency}")
        if self.concurrency is not None and not math.isinf(self.request_rate):
            raise ValueError("give request_rate or concurrency, not both")
        for name, limit in self.goodput_slos_ms:
            if name not in SLO_METRICS or not limit > 0:
                raise ValueError(f"a goodput SLO must be one of {', '.join(SLO_METRICS)} with a "
                                 f"limit > 0 ms, got {name}:{limit}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        for name in ("max_output_tokens", "num_prefixes", "prefix_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")


def request_rate(text: str) -> float:
    """A number of requests per second > 0, or inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or inf, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (inf = all at once), got {text}")
    return value


def seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
    return value


def slo(text: str) -> tuple[str, float]:
    """NAME:MS, e.g. ttft:300."""
    name, _, limit = text.partition(":")
    try:
        value = float(limit)
    except ValueError:
        value = math.nan
    if name not in SLO_METRICS or not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"expected NAME:MS with NAME one of {', '.join(SLO_METRICS)} and MS > 0, got {text!r}")
    return name, value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.add_argument("--base-url", default=DEFAULT_URL, metavar="URL",
                        help=f"the server, without /v1 (default {DEFAULT_URL})")
    parser.add_argument("--workload", default="chat", metavar="NAME|FILE",
                        help=f"{', '.join(WORKLOADS)}, or a ShareGPT JSONL file (default chat)")
    parser.add_argument("--num-requests", type=count, default=100, metavar="N",
                        help="requests to send (default 100)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=request_rate, default=math.inf, metavar="R",
                      help="Poisson arrivals, R requests per second on average (default inf: "
                      "all at once)")
    load.add_argument("--concurrency", type=count, metavar="C",
                      help="closed loop: keep at most C requests in flight instead")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the prompts, lengths and arrivals (default 0)")
    parser.add_argument("--goodput", type=slo, nargs="+", default=[], metavar="NAME:MS",
                        help=f"SLOs for goodput, NAME one of {', '.join(SLO_METRICS)} (E2E), "
                        "e.g. --goodput ttft:300 tpot:50; goodput counts the requests that meet "
                        "all of them")
    parser.add_argument("--model", metavar="M",
                        help="the model to ask for (default: the first of GET /v1/models)")
    parser.add_argument("--api-key", metavar="KEY",
                        help=f"bearer token (default: ${API_KEY_VARIABLES[0]}, else "
                        f"${API_KEY_VARIABLES[1]}, else none)")
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="chat",
                        help="/v1/chat/completions (chat, default) or /v1/completions (the "
                        "system prompt and the prompt joined into one text)")
    parser.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="an HF model directory whose tokenizer.json counts tokens exactly "
                        "(default: words for synthetic prompts, 4 characters a token for files)")
    parser.add_argument("--max-output-tokens", type=count, default=1024, metavar="N",
                        help="cap on every request's max_tokens (default 1024)")
    parser.add_argument("--num-prefixes", type=count, default=NUM_SHARED_PREFIXES, metavar="N",
                        help="shared-prefix: distinct system prompts, each starting the same "
                        f"number of requests (default {NUM_SHARED_PREFIXES})")
    parser.add_argument("--prefix-tokens", type=count, default=SHARED_PREFIX_LEN, metavar="N",
                        help=f"shared-prefix: tokens of each system prompt (default "
                        f"{SHARED_PREFIX_LEN})")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="do not send ignore_eos (for a server that refuses it); requests "
                        "may then stop before max_tokens")
    parser.add_argument("--timeout", type=seconds, default=600.0, metavar="S",
                        help="seconds a request may take before it counts as failed (default 600)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="write the results as JSON, with one record per request")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line on stderr")


def config_from_args(args: argparse.Namespace, command_line: str) -> ServeBenchConfig:
    api_key = args.api_key or next(
        (os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
    if args.api_key:
        command_line = command_line.replace(args.api_key, "***")
    names = [name for name, _ in args.goodput]
    if len(set(names)) != len(names):
        raise ValueError(f"--goodput names a metric twice: {' '.join(names)}")
    return ServeBenchConfig(
        base_url=args.base_url, workload=args.workload, num_requests=args.num_requests,
        request_rate=args.request_rate, concurrency=args.concurrency, seed=args.seed,
        goodput_slos_ms=tuple(args.goodput), model=args.model, api_key=api_key,
        endpoint=args.endpoint, tokenizer=args.tokenizer, max_output_tokens=args.max_output_tokens,
        num_prefixes=args.num_prefixes, prefix_tokens=args.prefix_tokens,
        ignore_eos=args.ignore_eos, timeout_s=args.timeout, out=args.out, progress=args.progress,
        command=command_line)


def main(args: argparse.Namespace, command_line: str) -> int:
    """Run the serving benchmark from parsed arguments; exit code 0, 1 (failed) or 2 (bad
    value)."""

    def load_run():
        from baton.bench.serve import run

        return run

    return run_benchmark("serve", lambda: config_from_args(args, command_line), load_run)
