"""`import baton` stays light, and the router never loads torch (DESIGN §1 dependency rules)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_baton_loads_neither_torch_nor_ray_nor_grpc() -> None:
    run("import sys, baton; "
        "bad = [m for m in ('torch', 'ray', 'grpc', 'transformers') if m in sys.modules]; "
        "assert not bad, bad")


def test_sdk_names_load_lazily_without_torch() -> None:
    run("import sys, baton; "
        "assert baton.Client.__name__ == 'Client' and baton.AsyncClient.__name__ == 'AsyncClient'; "
        "assert 'grpc' in sys.modules; "
        "bad = [m for m in ('torch', 'ray', 'engine') if m in sys.modules]; assert not bad, bad")


def test_unknown_attribute() -> None:
    import baton

    with pytest.raises(AttributeError):
        baton.NoSuchThing  # noqa: B018


def test_router_modules_are_torch_free() -> None:
    run("import sys, router.server, router.http_api, router.grpc_api, router.lifecycle; "
        "bad = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
        "assert not bad, bad")
