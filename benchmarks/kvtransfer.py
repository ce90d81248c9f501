"""The KV transfer benchmark, as a script: the same as `baton bench kvtransfer` (baton/bench/).

How Baton moves KV from a prefill worker to a decode worker, in one run: loopback gRPC throughput
against an in-process copy and where its time goes, time to first token disaggregated against
local prefill, the share of the transfer hidden under prefill compute, and int8 KV quality. A full
run writes docs/benchmarks/kvtransfer.{json,md,png}.

    python benchmarks/kvtransfer.py [--only wire,ttft,hidden,quality] [--quick] [--repeats 3]
                                    [--out-dir DIR]      (--help for all options)
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baton.bench import kvtransfer_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python benchmarks/kvtransfer.py")
    kvtransfer_config.add_kvtransfer_arguments(parser, default_out_dir=REPO / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return kvtransfer_config.main(args, shlex.join(["python", "benchmarks/kvtransfer.py", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
