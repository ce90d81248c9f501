"""The `baton` command: serve a cluster, show its status, chat with it, benchmark the engine.

    baton serve [--config baton.yaml] [--model M] [--prefill-workers N] [--decode-workers N] ...
    baton status [--url http://127.0.0.1:8000] [--json]
    baton chat "What is the capital of France?" [--grpc-address 127.0.0.1:50051 | --url URL]
    baton bench engine [--only decode,batch,prefill,prefix] [--quick] [--out-dir DIR] ...
    baton bench kvtransfer [--only wire,ttft,hidden,quality] [--quick] [--out-dir DIR] ...
    baton bench serve [--base-url URL] [--workload chat] [--request-rate R | --concurrency C] ...
    baton bench compare CONFIG.yaml [--out-dir DIR] [--only-clusters A,B]

Heavy modules (ray, torch, cluster, the SDK) are imported inside the subcommands, so `baton --help`
answers at once. Exit codes: 0 ok, 1 the command failed, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_GRPC_ADDRESS = "127.0.0.1:50051"
DEFAULT_BENCH_OUT_DIR = Path("docs") / "benchmarks"  # under the current directory
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port must be in [0, 65535], got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {text}")
    return value


def _max_tokens(text: str) -> int:
    value = _positive_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton",
        description="Baton: disaggregated LLM serving (prefill and decode workers on Ray).",
        epilog="Run `baton COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="start a cluster (router, prefill and decode workers) and serve until Ctrl-C",
        description="Start a local cluster: an embedded Redis (unless --redis-url), a local Ray "
        "runtime (unless --ray-address), prefill and decode workers and the router. Prints the "
        "HTTP and gRPC endpoints once everything is ready; Ctrl-C or SIGTERM drains and stops it. "
        "Flags override the config file.",
    )
    serve.add_argument("--config", metavar="FILE",
                       help="YAML config file (see deploy/baton.example.yaml for every key)")
    serve.add_argument("--model", metavar="M",
                       help="model name (default smollm2-135m-instruct), a .gguf file or an HF "
                       "model directory")
    serve.add_argument("--prefill-workers", type=_positive_int, metavar="N",
                       help="number of prefill workers (default 1; 0 = colocated, decode workers "
                       "prefill themselves)")
    serve.add_argument("--decode-workers", type=_positive_int, metavar="N",
                       help="number of decode workers (default 1)")
    serve.add_argument("--host", metavar="H", help="router bind address (default 127.0.0.1)")
    serve.add_argument("--http-port", type=_port, metavar="PORT",
                       help="router HTTP port, OpenAI API (default 8000; 0 = any free port)")
    serve.add_argument("--grpc-port", type=_port, metavar="PORT",
                       help="router gRPC port, baton.v1.Generation (default 50051; 0 = any free)")
    serve.add_argument("--redis-url", metavar="URL",
                       help="use this Redis (redis://HOST:PORT/DB) instead of an embedded one")
    serve.add_argument("--ray-address", metavar="ADDR",
                       help="join this Ray cluster (e.g. ray://HOST:10001 or auto) instead of "
                       "starting a local one")
    serve.set_defaults(func=cmd_serve)

    status = commands.add_parser(
        "status", help="show the workers of a running cluster",
        description="Ask a router for its view of the cluster (GET /cluster) and print one line "
        "per worker: id, role, state, gRPC address, pid, running and waiting requests, KV usage.",
    )
    status.add_argument("--url", default=DEFAULT_URL,
                        help=f"the router's HTTP base URL (default {DEFAULT_URL})")
    status.add_argument("--json", action="store_true", help="print the router's JSON as is")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    status.set_defaults(func=cmd_status)

    chat = commands.add_parser(
        "chat", help="send one chat message and stream the answer",
        description="Send one user message to a running cluster and stream the reply to stdout. "
        "Uses the gRPC SDK (baton.Client) by default, or the OpenAI HTTP API with --url. A router "
        "that wants an API key gets the BATON_API_KEY environment variable.",
    )
    chat.add_argument("message", help="the user message")
    where = chat.add_mutually_exclusive_group()
    where.add_argument("--grpc-address", default=None, metavar="HOST:PORT",
                       help=f"the router's gRPC address (default {DEFAULT_GRPC_ADDRESS})")
    where.add_argument("--url", default=None,
                       help="use the router's OpenAI HTTP API at this base URL instead of gRPC")
    chat.add_argument("--system", metavar="TEXT", help="a system message to put first")
    chat.add_argument("--temperature", type=_temperature, default=0.7,
                      help="sampling temperature, >= 0 (0 = greedy; default 0.7)")
    chat.add_argument("--max-tokens", type=_max_tokens, default=256,
                      help="most tokens to generate (default 256)")
    chat.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    chat.set_defaults(func=cmd_chat)

    from baton.bench.compare_config import add_compare_arguments
    from baton.bench.engine_config import add_engine_arguments  # torch-free: flags only
    from baton.bench.kvtransfer_config import add_kvtransfer_arguments
    from baton.bench.serve_config import add_serve_arguments

    bench = commands.add_parser(
        "bench", help="run a benchmark; results go to docs/benchmarks/",
        description="Run one of Baton's benchmarks on this machine. Each reports ratios measured "
        "in one run: the engine against the machine's own roofline and HF transformers, the KV "
        "transfer against an in-process copy and against local prefill. `serve` instead "
        "drives any running OpenAI-compatible server as a client; `compare` starts cluster "
        "configurations in turn and runs the same workloads against each.",
    )
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    bench_engine = benchmarks.add_parser(
        "engine", help="the engine against the roofline and HF generate (decode, batched "
        "decode, prefill, prefix cache)",
    )
    add_engine_arguments(bench_engine, default_out_dir=DEFAULT_BENCH_OUT_DIR)
    bench_engine.set_defaults(func=cmd_bench_engine)
    bench_kvtransfer = benchmarks.add_parser(
        "kvtransfer", help="KV transfer: loopback gRPC against an in-process copy, time to first "
        "token disaggregated against local prefill, transfer hidden under prefill, int8 quality",
    )
    add_kvtransfer_arguments(bench_kvtransfer, default_out_dir=DEFAULT_BENCH_OUT_DIR)
    bench_kvtransfer.set_defaults(func=cmd_bench_kvtransfer)
    bench_serve = benchmarks.add_parser(
        "serve", help="a running OpenAI-compatible server under a workload: throughput, TTFT, "
        "TPOT, ITL, E2E latency, goodput",
    )
    add_serve_arguments(bench_serve)
    bench_serve.set_defaults(func=cmd_bench_serve)
    bench_compare = benchmarks.add_parser(
        "compare", help="start each cluster configuration of a YAML file in turn (e.g. colocated "
        "against disaggregated), run the same workloads at several rates, compare",
    )
    add_compare_arguments(bench_compare, default_out_dir=DEFAULT_BENCH_OUT_DIR)
    bench_compare.set_defaults(func=cmd_bench_compare)
    return parser


# ---- serve --------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError, load_config

    overrides = {
        "model": args.model,
        "prefill.count": args.prefill_workers,
        "decode.count": args.decode_workers,
        "router.host": args.host,
        "router.http_port": args.http_port,
        "router.grpc_port": args.grpc_port,
        "redis_url": args.redis_url,
        "ray_address": args.ray_address,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"baton serve: error: {exc}", file=sys.stderr)
        return 2
    from cluster.launcher import serve

    return serve(config)


# ---- status -------------------------------------------------------------------------------------


def _workers_of(payload: Any) -> list[dict]:
    if isinstance(payload, dict):
        payload = payload.get("workers", [])
    return [w for w in payload if isinstance(w, dict)]


def _field(worker: dict, *names: str, default: Any = "") -> Any:
    for name in names:
        if name in worker and worker[name] is not None:
            return worker[name]
    return default


def format_status(payload: Any) -> str:
    workers = _workers_of(payload)
    if not workers:
        return "no workers registered"
    header = ("ID", "ROLE", "STATE", "ADDRESS", "PID", "RUNNING", "WAITING", "KV USAGE")
    rows = [header]
    for w in sorted(workers, key=lambda w: (str(_field(w, "role")), str(_field(w, "id", "worker_id")))):
        kv = _field(w, "kv_usage", default=None)
        rows.append((
            str(_field(w, "id", "worker_id")),
            str(_field(w, "role")),
            str(_field(w, "state")),
            str(_field(w, "grpc_address", "address")),
            str(_field(w, "pid")),
            str(_field(w, "running", "num_running", default=0)),
            str(_field(w, "waiting", "num_waiting", default=0)),
            f"{float(kv):.1%}" if isinstance(kv, (int, float)) else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def _auth_headers() -> dict[str, str]:
    """The router's API key, from BATON_API_KEY, for the HTTP calls of status and chat."""
    key = os.environ.get("BATON_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def cmd_status(args: argparse.Namespace) -> int:
    import httpx

    url = args.url.rstrip("/") + "/cluster"
    try:
        response = httpx.get(url, headers=_auth_headers(), timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"baton status: cannot reach the router at {args.url} ({exc}); is `baton serve` "
              "running? Pass its address with --url", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"baton status: {url} answered HTTP {response.status_code}: {response.text[:500]}",
              file=sys.stderr)
        return 1
    payload = response.json()
    print(json.dumps(payload, indent=2) if args.json else format_status(payload))
    return 0


# ---- chat ---------------------------------------------------------------------------------------


def _messages(args: argparse.Namespace) -> list[dict]:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": args.message}]


def _chat_http(args: argparse.Namespace) -> int:
    import httpx

    base = args.url.rstrip("/")
    body = {"messages": _messages(args), "temperature": args.temperature,
            "max_tokens": args.max_tokens, "stream": True}
    headers = _auth_headers()
    try:
        models = httpx.get(f"{base}/v1/models", headers=headers, timeout=10).json().get("data", [])
        if models:
            body["model"] = models[0]["id"]
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers,
                          timeout=args.timeout) as response:
            if response.status_code != 200:
                response.read()
                print(f"\nbaton chat: HTTP {response.status_code}: {response.text[:500]}",
                      file=sys.stderr)
                return 1
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                for choice in json.loads(data).get("choices", []):
                    sys.stdout.write(choice.get("delta", {}).get("content") or "")
                    sys.stdout.flush()
    except httpx.HTTPError as exc:
        print(f"\nbaton chat: cannot reach the router at {args.url} ({exc})", file=sys.stderr)
        return 1
    print()
    return 0


def _chat_grpc(args: argparse.Namespace) -> int:
    from baton.client import BatonError, Client, DeadlineExceededError, UnavailableError

    address = args.grpc_address or DEFAULT_GRPC_ADDRESS
    with Client(address, timeout=args.timeout) as client:
        try:
            for chunk in client.stream(messages=_messages(args), temperature=args.temperature,
                                       max_tokens=args.max_tokens):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except UnavailableError as exc:
            print(f"\nbaton chat: cannot reach the router at {address} ({exc.message}); is "
                  "`baton serve` running? Pass its gRPC address with --grpc-address",
                  file=sys.stderr)
            return 1
        except DeadlineExceededError:
            print(f"\nbaton chat: no complete answer from {address} within {args.timeout:g} s; is "
                  "`baton serve` running there? Pass its gRPC address with --grpc-address, or "
                  "allow more time with --timeout", file=sys.stderr)
            return 1
        except BatonError as exc:
            print(f"\nbaton chat: {exc}", file=sys.stderr)
            return 1
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    return _chat_http(args) if args.url else _chat_grpc(args)


# ---- bench --------------------------------------------------------------------------------------


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from baton.bench import engine_config

    return engine_config.main(args, shlex.join(["baton", *args.argv]))


def cmd_bench_kvtransfer(args: argparse.Namespace) -> int:
    from baton.bench import kvtransfer_config

    return kvtransfer_config.main(args, shlex.join(["baton", *args.argv]))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from baton.bench import serve_config

    return serve_config.main(args, shlex.join(["baton", *args.argv]))


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from baton.bench import compare_config
    from cluster.config import config_from_dict  # checks each cluster before any starts

    return compare_config.main(args, shlex.join(["baton", *args.argv]), config_from_dict)


# ---- entry point --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # serve and bench narrate their progress; the client commands speak only when something fails
    quiet = logging.INFO if args.command in ("serve", "bench") else logging.WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else quiet, format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
