"""The engine benchmark, as a script: the same as `baton bench engine` (baton/bench/).

Baton's engine against this machine's roofline (GEMM FLOP/s, memory read GB/s) and HF transformers
generate(), in one run: single-stream and batched decode, prefill, and the prefix cache in both
worker roles. A full run writes docs/benchmarks/engine.{json,md,png}.

    python benchmarks/engine.py [--only decode,batch,prefill,prefix] [--quick] [--tokens 64]
                                [--repeats 3] [--out-dir DIR]      (--help for all options)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baton.bench import engine_config, options


def main(argv: list[str] | None = None) -> int:
    return options.script_main("engine.py", REPO, engine_config.add_engine_arguments,
                               engine_config.main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
