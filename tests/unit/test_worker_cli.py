"""`python -m prefill_worker` / `python -m decode_worker`: each role's flags in --help, argument
errors that name the flag and its range, and --help that answers without loading torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from baton.worker import build_parser, main

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--model", "--host", "--port", "--metrics-port", "--worker-id",
          "--kv-cache-memory-bytes", "--threads", "--device", "--dtype", "--grace-s", "READY"]


@pytest.mark.parametrize("role, present, absent", [
    ("prefill", ["--kv-chunk-bytes"], ["--kv-lease-s"]),
    ("decode", ["--kv-lease-s"], ["--kv-chunk-bytes"]),
])
def test_help_lists_the_roles_flags(role, present, absent):
    text = build_parser(role).format_help()
    assert f"python -m {role}_worker" in text
    assert [w for w in [*COMMON, *present] if w not in text] == []
    assert [w for w in absent if w in text] == []


@pytest.mark.parametrize("role, argv, message", [
    ("decode", ["--port", "70000"], "--port: must be [0, 65535], got 70000"),
    ("decode", ["--kv-lease-s", "0"], "--kv-lease-s: must be >= 0.001, got 0.0"),
    ("prefill", ["--kv-chunk-bytes", "zero"], "--kv-chunk-bytes: expected a number, got 'zero'"),
    ("prefill", ["--threads", "0"], "--threads: must be >= 1, got 0"),
    ("prefill", ["--dtype", "int4"], "dtype must be auto, float32, bfloat16 or float16"),
    ("decode", [], "--model must be an HF model directory with a config.json"),
])
def test_argument_errors_name_the_flag_and_range(capsys, tmp_path, role, argv, message):
    def unreachable():
        raise AssertionError("the worker must not be built after an argument error")

    with pytest.raises(SystemExit) as exited:
        main(role, unreachable, ["--model", str(tmp_path), *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_help_does_not_load_torch():
    code = ("import sys, runpy; sys.argv = ['decode_worker', '--help']\n"
            "try:\n    runpy.run_module('decode_worker', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "--kv-lease-s" in done.stdout
