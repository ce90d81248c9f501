"""The KV transfer benchmark's options: flags, a frozen config, and the entry point. Torch-free.

`baton bench kvtransfer` and `python benchmarks/kvtransfer.py` both call add_kvtransfer_arguments
on their parser and main(args, command_line); the measuring code (baton.bench.kvtransfer) is
imported only once the arguments are valid. A partial run (--only, --quick) writes files only
where --out-dir says, so it never overwrites the committed results of a full run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from baton.bench.engine_config import DEFAULT_MODEL
from baton.bench.options import (
    add_common_arguments,
    check_parts,
    check_positive,
    finish_config,
    run_benchmark,
)

PARTS = ("wire", "ttft", "hidden", "quality")
# The wire part's KV geometry: SmolLM2-135M's (layers, KV heads, head_dim), float32.
WIRE_GEOMETRY = (30, 3, 64)

DESCRIPTION = """\
Measure how Baton moves KV from a prefill worker to a decode worker, in one run, on CPU in float32.
Parts (all by default; pick some with --only):

  wire     loopback throughput of one 64 MiB KV push (SmolLM2 geometry: 30 layers, 3 KV heads,
           head_dim 64) into a real KVReceiver that writes into a preallocated tensor: through
           a shared-memory ring (as to a decode worker on the same host) and in the gRPC stream
           over 127.0.0.1 (as to another host); GB/s against an in-process copy of the same
           bytes (torch copy_). Also each stage of the stream's push timed alone: encode (with
           CRC-32C), gRPC (a sink that only counts bytes), decode (with validation), write
  ttft     time to first token of 256/1024/2048-token random prompts through the router's gRPC
           API (the SDK, max_tokens=1, timed at the client): 1 prefill + 1 decode worker
           (disaggregated) against the same decode worker prefilling locally (a router that
           knows no prefill worker); the KV bytes each prompt moves
  hidden   the share of each prompt's KV transfer (through a ring) hidden under prefill compute:
           1 - (disaggregated TTFT - local TTFT) / (the push of that KV alone), in [0, 1]
  quality  int8 KV against float32 KV (baton.bench.kv_quality): greedy agreement,
           largest logit difference, bytes ratio

Every timing is the best of --repeats runs, interleaved between the sides compared. The workers
and routers run in this process on loopback, each engine with the same threads.

A full run writes kvtransfer.json, kvtransfer.md and kvtransfer.png to the output directory;
--quick or --only write only where --out-dir says. Progress goes to stderr, the report to stdout.
A full run takes several minutes on a small CPU; --quick about one."""


@dataclass(frozen=True)
class KVTransferBenchConfig:
    model: str = DEFAULT_MODEL
    parts: tuple[str, ...] = PARTS
    num_repeats: int = 3  # interleaved timed runs; the fastest counts
    wire_bytes: int = 64 << 20  # KV of one push in the wire part (whole tokens of WIRE_GEOMETRY)
    prompt_lens: tuple[int, ...] = (256, 1024, 2048)
    quality_num_prompts: int = 20
    quality_num_tokens: int = 64
    kv_cache_memory_bytes: int = 256 << 20  # per engine
    num_threads: int | None = None  # None = torch's default (all cores)
    seed: int = 0  # random prompts and KV values
    cache_dir: Path | None = None  # prepared-model cache; None = engine.weights' default
    out_dir: Path | None = None  # None = print the report only
    command: str = ""  # the command line, recorded in the results

    def __post_init__(self) -> None:
        check_parts(self.parts, PARTS)
        check_positive(self, ("num_repeats", "wire_bytes", "quality_num_prompts",
                              "quality_num_tokens", "kv_cache_memory_bytes"))
        if self.wire_bytes < wire_bytes_per_token():
            raise ValueError(f"wire_bytes must hold at least one token's KV "
                             f"({wire_bytes_per_token()} bytes), got {self.wire_bytes}")
        if not self.prompt_lens or min(self.prompt_lens) <= 0:
            raise ValueError(f"prompt_lens must be positive numbers, got {self.prompt_lens}")

    def quick(self) -> KVTransferBenchConfig:
        """A smoke run: about a minute instead of several."""
        return dataclasses.replace(self, num_repeats=1, wire_bytes=16 << 20,
                                   prompt_lens=(256, 1024), quality_num_prompts=2,
                                   quality_num_tokens=8)


def wire_bytes_per_token() -> int:
    num_layers, num_kv_heads, head_dim = WIRE_GEOMETRY
    return num_layers * 2 * num_kv_heads * head_dim * 4  # K and V, float32


def add_kvtransfer_arguments(parser: argparse.ArgumentParser, default_out_dir: Path) -> None:
    add_common_arguments(
        parser, description=DESCRIPTION, parts=PARTS, default_model=DEFAULT_MODEL,
        default_out_dir=default_out_dir, results="kvtransfer.json, kvtransfer.md and kvtransfer.png",
        quick_help="a short smoke run: one repeat, a 16 MiB push, 256- and 1024-token prompts, "
        "2 quality prompts of 8 tokens",
        threads_help="torch threads of every engine (default: torch's default, all cores)")


def config_from_args(args: argparse.Namespace, command_line: str) -> KVTransferBenchConfig:
    config = KVTransferBenchConfig(model=args.model, parts=args.only, num_threads=args.threads,
                                   cache_dir=args.cache_dir, command=command_line)
    return finish_config(config, args, PARTS)


def main(args: argparse.Namespace, command_line: str) -> int:
    """Run the KV transfer benchmark from parsed arguments; exit code 0, 1 (failed) or 2 (bad
    value)."""

    def load_run():
        from baton.bench.kvtransfer import run

        return run

    return run_benchmark("KV transfer", lambda: config_from_args(args, command_line), load_run)
