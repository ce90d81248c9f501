"""The comparison benchmark, as a script: the same as `baton bench compare` (baton/bench/).

Starts each cluster configuration of a YAML file in turn, runs the same workloads against each
at several rates, and writes a markdown report with ratios to the first cluster, JSON and plots.
A run without --only-clusters writes docs/benchmarks/<name>.{json,md,png} and <name>-*.png.

    python benchmarks/compare.py benchmarks/serving.yaml [--out-dir DIR] [--only-clusters A,B]
    python benchmarks/compare.py benchmarks/routing.yaml            (--help for the format)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from baton.bench import compare_config, options
from cluster.config import config_from_dict


def main(argv: list[str] | None = None) -> int:
    return options.script_main(
        "compare.py", REPO, compare_config.add_compare_arguments,
        lambda args, command: compare_config.main(args, command, config_from_dict), argv)


if __name__ == "__main__":
    raise SystemExit(main())
