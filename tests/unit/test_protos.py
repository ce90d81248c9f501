"""The committed stubs in baton/v1/ are exactly what proto/ generates (run `make proto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton import protogen

pytestmark = pytest.mark.unit


def test_stubs_are_current(tmp_path: Path):
    generated = {p.name: p.read_bytes() for p in protogen.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in protogen.OUT_DIR.glob("*_pb2*.py*")}
    assert generated.keys() == committed.keys(), "stub files differ: run `make proto`"
    stale = sorted(name for name in generated if generated[name] != committed[name])
    assert not stale, f"stale stubs {stale}: run `make proto`"


def test_proto_is_not_a_python_package():
    # ray[default] installs proto-plus, which owns the import name `proto`
    assert not (protogen.PROTO_DIR / "__init__.py").exists()
