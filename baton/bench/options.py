"""What the benchmarks' command lines share: value types, the common flags, the entry point.
Torch-free: `baton --help` imports this."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

C = TypeVar("C")  # a benchmark's frozen config dataclass


def count(text: str) -> int:
    """A whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parts_type(all_parts: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """The type of --only: a comma-separated, non-empty list of some of all_parts."""

    def parts(text: str) -> tuple[str, ...]:
        chosen = tuple(p.strip() for p in text.split(",") if p.strip())
        unknown = [p for p in chosen if p not in all_parts]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(all_parts)}, got {text!r}")
        return chosen

    return parts


def check_parts(parts: tuple[str, ...], all_parts: tuple[str, ...]) -> None:
    """Raise ValueError unless parts is a non-empty subset of all_parts."""
    if not parts or any(p not in all_parts for p in parts):
        raise ValueError(f"parts must be a non-empty subset of {', '.join(all_parts)}, "
                         f"got {', '.join(parts) or 'none'}")


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    description: str,
    parts: tuple[str, ...],
    default_model: str,
    default_out_dir: Path,
    results: str,
    quick_help: str,
    threads_help: str,
) -> None:
    """The flags every benchmark takes (a benchmark adds its own after them); results names the
    files a run writes, e.g. "engine.json, engine.md and engine.png"."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = description
    parser.add_argument("--model", default=default_model, metavar="M",
                        help=f"model name, .gguf file or HF directory (default {default_model})")
    parser.add_argument("--only", type=parts_type(parts), default=parts, metavar="PARTS",
                        help=f"comma-separated parts to run: {','.join(parts)} (default all)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=count, metavar="N",
                        help="interleaved timed runs per measurement, the fastest counts "
                        "(default 3; quick 1)")
    parser.add_argument("--threads", type=count, metavar="N", help=threads_help)
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="prepared-model cache (default ~/.cache/baton/models)")
    parser.add_argument("--out-dir", type=Path, metavar="DIR",
                        help=f"where {results} go (default {default_out_dir} for a full run; "
                        "--quick and --only write nothing unless given this)")
    parser.set_defaults(default_out_dir=default_out_dir)


def finish_config(config: C, args: argparse.Namespace, parts: tuple[str, ...], **flags) -> C:
    """config with --quick, then the benchmark's own flags (field=value, None = not given),
    --repeats and the output directory applied: a full run writes to the default directory, a
    partial one (--only, --quick) only where --out-dir says, so it never overwrites the committed
    results of a full run."""
    if args.quick:
        config = config.quick()
    flags["num_repeats"] = args.repeats
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    full = set(config.parts) == set(parts) and not args.quick
    return dataclasses.replace(config, out_dir=args.out_dir or (args.default_out_dir if full else None))


def run_benchmark(name: str, make_config: Callable[[], C],
                  load_run: Callable[[], Callable[[C], object]]) -> int:
    """Build the config, then import and run the measuring code; the exit code: 0, 1 (the run
    failed) or 2 (a bad value)."""
    try:
        config = make_config()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        load_run()(config)
    except (ValueError, RuntimeError) as exc:
        logging.getLogger(__name__).error("%s benchmark failed: %s", name, exc)
        return 1
    return 0


def check_positive(config: object, names: tuple[str, ...]) -> None:
    """Raise ValueError naming the field unless each of config's `names` is > 0, and num_threads
    is None or > 0."""
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    num_threads = getattr(config, "num_threads", None)
    if num_threads is not None and num_threads <= 0:
        raise ValueError(f"num_threads must be > 0, got {num_threads}")


def script_main(script: str, repo: Path, add_arguments: Callable[..., None],
                main: Callable[[argparse.Namespace, str], int], argv: list[str] | None) -> int:
    """benchmarks/<script> run as a script: parse, log to stderr, run; the full-run results go
    to the repository's docs/benchmarks."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog=f"python benchmarks/{script}")
    add_arguments(parser, default_out_dir=repo / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main(args, shlex.join(["python", f"benchmarks/{script}", *argv]))
