"""The engine benchmark's options: flags, a frozen config, and the entry point. Torch-free.

`baton bench engine` and `python benchmarks/engine.py` both call add_engine_arguments on their
parser and main(args, command_line); the measuring code (baton.bench.engine) is imported only
once the arguments are valid. A partial run (--only, --quick) writes files only where --out-dir
says, so it never overwrites the committed results of a full run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from baton.bench.options import (
    add_common_arguments,
    check_parts,
    check_positive,
    count,
    finish_config,
    run_benchmark,
)

PARTS = ("decode", "batch", "prefill", "prefix")
DEFAULT_MODEL = "smollm2-135m-instruct"  # engine.weights.DEFAULT_MODEL (that module loads torch)
DEFAULT_OUT_DIR = Path("docs") / "benchmarks"

DESCRIPTION = """\
Measure the Baton engine against this machine's roofline and HF transformers generate(), in one
run, on CPU in float32 with all threads. Parts (all by default; pick some with --only):

  decode   single-stream decode, Baton vs HF generate at batch 1, and whether the outputs are
           token-identical
  batch    aggregate decode tokens/s of Baton at 1/8/32/64 concurrent requests and of HF
           generate at batch 8/32 (steady decode, prefill excluded)
  prefill  time to the first token of 128/512/2048-token prompts; tokens/s and FLOP/s against
           the GEMM roofline
  prefix   time to the first token with the first 1024 prompt tokens in the prefix cache vs cold,
           for the prefill role (add_request) and the decode role (reserve, write_kv, commit)

The machine is always measured, before every part and at the end (the best of all counts): fp32
GEMM FLOP/s and memory read GB/s. They give the memory floor (read GB/s / weight bytes, one stream) and the GEMM roofline
(GEMM FLOP/s / 2 x parameters), both in tokens/s, that the results are divided by.

A full run writes engine.json, engine.md and engine.png to the output directory; --quick or --only
write only where --out-dir says. Progress goes to stderr, the report to stdout. A full run takes
many minutes on a small CPU; --quick takes one or two."""


@dataclass(frozen=True)
class EngineBenchConfig:
    model: str = DEFAULT_MODEL
    parts: tuple[str, ...] = PARTS
    num_new_tokens: int = 64  # per generation, for decode and batch
    num_repeats: int = 3  # interleaved timed runs; the fastest counts
    hf_batch_sizes: tuple[int, ...] = (1, 8, 32)  # batch 1 belongs to the decode part
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    prefill_lens: tuple[int, ...] = (128, 512, 2048)
    num_prefix_tokens: int = 1024  # cached part of the prefix-cache prompt
    num_suffix_tokens: int = 128  # uncached rest of it
    gemm_size: int = 2048
    read_bytes: int = 256 << 20
    kv_cache_memory_bytes: int = 512 << 20
    num_threads: int | None = None  # None = torch's default (all cores)
    cache_dir: Path | None = None  # prepared-model cache; None = engine.weights' default
    out_dir: Path | None = None  # None = print the report only
    command: str = ""  # the command line, recorded in the results

    def __post_init__(self) -> None:
        check_parts(self.parts, PARTS)
        check_positive(self, ("num_new_tokens", "num_repeats", "num_prefix_tokens",
                              "num_suffix_tokens", "gemm_size", "read_bytes",
                              "kv_cache_memory_bytes"))
        if self.num_new_tokens < 2:
            raise ValueError(f"num_new_tokens must be >= 2 (decode excludes the first token), "
                             f"got {self.num_new_tokens}")
        for name in ("hf_batch_sizes", "concurrency", "prefill_lens"):
            values = getattr(self, name)
            if not values or min(values) <= 0:
                raise ValueError(f"{name} must be positive numbers, got {values}")

    def quick(self) -> EngineBenchConfig:
        """A smoke run: a minute or two instead of many."""
        return dataclasses.replace(
            self, num_new_tokens=16, num_repeats=1, hf_batch_sizes=(1, 8), concurrency=(1, 8),
            prefill_lens=(128,), num_prefix_tokens=256, num_suffix_tokens=32,
        )


def add_engine_arguments(parser: argparse.ArgumentParser, default_out_dir: Path) -> None:
    add_common_arguments(
        parser, description=DESCRIPTION, parts=PARTS, default_model=DEFAULT_MODEL,
        default_out_dir=default_out_dir, results="engine.json, engine.md and engine.png",
        quick_help="a short smoke run: 16 tokens, one repeat, fewer sizes",
        threads_help="torch threads (default: torch's default, all cores)")
    parser.add_argument("--tokens", type=count, metavar="N",
                        help="new tokens per generation for decode and batch (default 64; "
                        "quick 16)")


def config_from_args(args: argparse.Namespace, command_line: str) -> EngineBenchConfig:
    config = EngineBenchConfig(model=args.model, parts=args.only, num_threads=args.threads,
                               cache_dir=args.cache_dir, command=command_line)
    return finish_config(config, args, PARTS, num_new_tokens=args.tokens)


def main(args: argparse.Namespace, command_line: str) -> int:
    """Run the engine benchmark from parsed arguments; exit code 0, 1 (failed) or 2 (bad value)."""

    def load_run():
        from baton.bench.engine import run

        return run

    return run_benchmark("engine", lambda: config_from_args(args, command_line), load_run)
