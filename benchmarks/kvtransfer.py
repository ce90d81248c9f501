"""The KV transfer benchmark, as a script: the same as `baton bench kvtransfer` (baton/bench/).

How Baton moves KV from a prefill worker to a decode worker, in one run: loopback gRPC throughput
against an in-process copy and where its time goes, time to first token disaggregated against
local prefill, the share of the transfer hidden under prefill compute, and int8 KV quality. A full
run writes docs/benchmarks/kvtransfer.{json,md,png}.

    python benchmarks/kvtransfer.py [--only wire,ttft,hidden,quality] [--quick] [--repeats 3]
                                    [--out-dir DIR]      (--help for all options)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baton.bench import kvtransfer_config, options


def main(argv: list[str] | None = None) -> int:
    return options.script_main("kvtransfer.py", REPO, kvtransfer_config.add_kvtransfer_arguments,
                               kvtransfer_config.main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
