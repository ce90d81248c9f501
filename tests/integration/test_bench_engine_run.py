"""The engine benchmark's machinery, end to end on a tiny random model with tiny sizes: every part
runs, Baton's output matches HF generate, and the JSON, markdown and plot are written. The numbers
themselves are not checked: benchmarks are not timed tests."""

from __future__ import annotations

import json

import pytest

from baton.bench import engine_report
from baton.bench.engine_config import PARTS, EngineBenchConfig
from tests.support.models import tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_tiny_run_of_every_part(tmp_path, capsys):
    from baton.bench.engine import run
    from baton.bench.roofline import prefill_flops
    from engine.config import ModelConfig

    model_dir = tiny_model("llama-gqa")
    config = EngineBenchConfig(
        model=str(model_dir), num_new_tokens=6, num_repeats=1, hf_batch_sizes=(1, 4),
        concurrency=(1, 4), prefill_lens=(16, 40), num_prefix_tokens=64, num_suffix_tokens=16,
        gemm_size=128, read_bytes=1 << 20, kv_cache_memory_bytes=1 << 20, out_dir=tmp_path,
        command="baton bench engine --test",
    )
    result = run(config)

    assert result["parts"] == list(PARTS)
    assert result["decode"]["outputs_identical"] is True
    assert result["decode"]["baton"]["decode_tokens_per_s"] > 0
    assert [row["concurrency"] for row in result["batch"]["baton"]] == [1, 4]
    assert [row["batch_size"] for row in result["batch"]["hf_generate"]] == [4]  # 1: decode's
    assert [row["batch_size"] for row in engine_report.hf_rows(result)] == [1, 4]
    assert result["batch"]["num_preemptions"] == 0
    assert all(row["tokens_per_s"] > 0 for row in result["batch"]["baton"])
    mc = ModelConfig.from_dir(model_dir)
    assert [(p["prompt_tokens"], p["flops"]) for p in result["prefill"]] == [
        (16, prefill_flops(mc, 16)), (40, prefill_flops(mc, 40))]
    for role in ("prefill_role", "decode_role"):
        row = result["prefix"][role]
        assert row["cold_s"] > 0
        # a prefix cache that reports nothing for a prefix it just saw is a defect, not "n/a"
        assert row["available"] is True, row["reason"]
        assert row["num_cached_tokens"] == 64
        assert row["ratio_cached_over_cold"] == row["cached_s"] / row["cold_s"]
    assert set(result["ratios"]) == set(engine_report.RATIOS)
    assert result["ratios"]["outputs_identical_to_hf"] is True
    assert result["ratios"]["batch32_over_hf_batch32"] is None  # not measured at 32

    assert json.loads((tmp_path / "engine.json").read_text()) == result
    markdown = (tmp_path / "engine.md").read_text()
    assert markdown == capsys.readouterr().out
    assert "`baton bench engine --test`" in markdown and "## Prefix cache" in markdown
    assert (tmp_path / "engine.png").read_bytes()[:4] == b"\x89PNG"
