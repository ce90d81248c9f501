"""The engine benchmark, as a script: the same as `baton bench engine` (baton/bench/).

Baton's engine against this machine's roofline (GEMM FLOP/s, memory read GB/s) and HF transformers
generate(), in one run: single-stream and batched decode, prefill, and the prefix cache in both
worker roles. A full run writes docs/benchmarks/engine.{json,md,png}.

    python benchmarks/engine.py [--only decode,batch,prefill,prefix] [--quick] [--tokens 64]
                                [--repeats 3] [--out-dir DIR]      (--help for all options)
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baton.bench import engine_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python benchmarks/engine.py")
    engine_config.add_engine_arguments(parser, default_out_dir=REPO / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return engine_config.main(args, shlex.join(["python", "benchmarks/engine.py", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
