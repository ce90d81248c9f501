"""`python -m decode_worker --model DIR ...`: one decode worker as a process (see --help)."""

import sys

from baton.worker import main


def _worker_cls():
    from decode_worker.server import DecodeWorker

    return DecodeWorker


if __name__ == "__main__":
    sys.exit(main("decode", _worker_cls))
