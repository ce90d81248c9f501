"""`python -m prefill_worker --model DIR ...`: one prefill worker as a process (see --help)."""

import sys

from baton.worker import main


def _worker_cls():
    from prefill_worker.server import PrefillWorker

    return PrefillWorker


if __name__ == "__main__":
    sys.exit(main("prefill", _worker_cls))
