"""The KV transfer benchmark's machinery, end to end on a tiny random model with tiny sizes: the
wire push arrives intact, real workers and routers answer in both modes, the decode worker receives
exactly the KV the geometry implies, and the JSON, markdown and plot are written. The timings
themselves are not checked: benchmarks are not timed tests."""

from __future__ import annotations

import json

import pytest

from baton.bench import kvtransfer_report
from baton.bench.kvtransfer_config import PARTS, KVTransferBenchConfig
from tests.support.models import tiny_model

pytestmark = pytest.mark.integration


def test_a_tiny_run_of_every_part(tmp_path, capsys):
    from baton.bench.kvtransfer import run
    from engine.config import ModelConfig

    model_dir = tiny_model("llama-gqa")
    config = KVTransferBenchConfig(
        model=str(model_dir), num_repeats=1, wire_bytes=1 << 20, prompt_lens=(32, 96, 4096),
        quality_num_prompts=1, quality_num_tokens=4, kv_cache_memory_bytes=16 << 20,
        out_dir=tmp_path, command="baton bench kvtransfer --test",
    )
    result = run(config)

    assert result["parts"] == list(PARTS)
    wire = result["wire"]
    assert wire["num_tokens"] == (1 << 20) // 46080 and wire["num_bytes"] == 22 * 46080
    assert wire["push_bytes_per_s"] > 0 and wire["copy_bytes_per_s"] > 0
    assert wire["ratio_push_over_copy"] == wire["push_bytes_per_s"] / wire["copy_bytes_per_s"]
    assert wire["ring_push_bytes_per_s"] > 0  # the receiver got it all intact (else it raises)
    assert wire["ratio_ring_push_over_copy"] == (wire["ring_push_bytes_per_s"]
                                                 / wire["copy_bytes_per_s"])
    assert set(wire["stages"]) == {"encode", "grpc", "decode", "write"}
    assert wire["bottleneck"] in wire["stages"]

    mc = ModelConfig.from_dir(model_dir)
    bytes_per_token = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * 4
    # 4096 tokens exceed the tiny model's context: skipped, not failed
    assert [row["prompt_tokens"] for row in result["ttft"]] == [32, 96]
    for row in result["ttft"]:
        assert row["kv_bytes"] == row["kv_bytes_received"] == row["prompt_tokens"] * bytes_per_token
        assert row["disaggregated_s"] > 0 and row["local_s"] > 0
    for row in result["hidden"]:
        assert 0 <= row["hidden_share"] <= 1
        assert row["exposed_s"] == row["ttft_disaggregated_s"] - row["ttft_local_s"]
        assert row["transfer_s"] > 0

    quality = result["quality"]
    assert quality["figures"]["num_prompts"] == 1
    assert result["ratios"]["int8_bytes_ratio"] == quality["figures"]["bytes_ratio"]
    assert set(result["ratios"]) == set(kvtransfer_report.RATIOS)
    assert result["ratios"]["ttft_disaggregated_over_local_2048"] is None  # not measured

    assert json.loads((tmp_path / "kvtransfer.json").read_text()) == result
    markdown = (tmp_path / "kvtransfer.md").read_text()
    assert markdown == capsys.readouterr().out
    assert "`baton bench kvtransfer --test`" in markdown and "## Transfer hidden" in markdown
    assert (tmp_path / "kvtransfer.png").read_bytes()[:4] == b"\x89PNG"
