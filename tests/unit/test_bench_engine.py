"""The engine benchmark's arithmetic and report: parameter and FLOP counts, the ratios the project
tracks, and a report that says what is missing instead of failing."""

from __future__ import annotations

import dataclasses

import pytest

from baton.bench import engine_report
from baton.bench.engine_config import EngineBenchConfig
from engine.config import ModelConfig
from tests.support.models import TINY_MODELS, tiny_model

pytestmark = pytest.mark.unit

SMALL = ModelConfig(
    architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4, intermediate_size=8,
    num_layers=3, num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-6, rope_theta=1e4,
    max_position_embeddings=64, tie_word_embeddings=True, attention_bias=False,
)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_parameters_are_counted_as_transformers_counts_them(name):
    from transformers import AutoModelForCausalLM

    from baton.bench.roofline import count_parameters

    model_dir = tiny_model(name)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert count_parameters(ModelConfig.from_dir(model_dir)) == hf.num_parameters()


def test_prefill_flops_by_hand():
    from baton.bench.roofline import prefill_flops

    # per layer: q 4x4, k 4x2, v 4x2, o 4x4 = 48 weights; gate, up, down 3 x 4x8 = 96
    matmuls = 2 * 5 * 3 * (48 + 96)
    attention = 2 * 2 * 2 * 2 * 3 * (5 * 6 // 2)  # 2 matmuls x 2 FLOPs x head_dim x heads x layers
    logits = 2 * 10 * 4
    assert prefill_flops(SMALL, 5) == matmuls + attention + logits == 5120


def full_result() -> dict:
    return {
        "model": "m", "dtype": "float32", "num_parameters": 1_000_000, "weight_bytes": 4_000_000,
        "num_repeats": 3, "command": "baton bench engine",
        "memory_floor_tokens_per_s": 20.0, "gemm_roofline_tokens_per_s": 400.0,
        "machine": {"cpu_count": 2, "torch_threads": 2, "processor": "x86_64", "torch": "2",
                    "python": "3", "load_average_1m": [1.0, 2.0], "gemm_size": 2048,
                    "gemm_flops_per_s": 8e8, "read_bytes": 1 << 28, "read_bytes_per_s": 8e7},
        "decode": {"prompt_tokens": 48, "new_tokens": 64, "outputs_identical": True,
                   "baton": {"first_token_s": 0.1, "total_s": 6.4, "decode_tokens_per_s": 10.0},
                   "hf_generate": {"first_token_s": 0.1, "total_s": 12.7,
                                   "decode_tokens_per_s": 5.0}},
        "batch": {"prompt_tokens": 48, "new_tokens": 64, "num_preemptions": 0,
                  "baton": [{"concurrency": c, "tokens_per_s": r}
                            for c, r in ((1, 10.0), (8, 60.0), (32, 150.0), (64, 200.0))],
                  "hf_generate": [{"batch_size": b, "first_token_s": 0.1, "total_s": 1.0,
                                   "tokens_per_s": r} for b, r in ((8, 40.0), (32, 100.0))]},
        "prefill": [{"prompt_tokens": 512, "ttft_s": 1.0, "tokens_per_s": 512.0, "flops": 4e8,
                     "flops_per_s": 4e8, "ratio_to_gemm": 0.5}],
        "prefix": {"num_prefix_tokens": 1024, "prompt_tokens": 1152,
                   "prefill_role": {"available": True, "reason": None, "num_cached_tokens": 1024,
                                    "cached_s": 0.5, "cold_s": 2.0, "ratio_cached_over_cold": 0.25},
                   "decode_role": {"available": False, "reason": "no prefix cache",
                                   "num_cached_tokens": 0, "cached_s": None, "cold_s": 0.1,
                                   "ratio_cached_over_cold": None}},
    }


def test_the_tracked_ratios():
    assert engine_report.ratios(full_result()) == {
        "decode_over_memory_floor": 0.5,
        "decode_over_hf_batch1": 2.0,  # HF batch 1 comes from the decode part
        "batch32_over_hf_batch32": 1.5,
        "batch64_over_gemm_roofline": 0.5,
        "prefill512_over_gemm_roofline": 0.5,
        "prefix_prefill_role_cached_over_cold": 0.25,
        "prefix_decode_role_cached_over_cold": None,
        "outputs_identical_to_hf": True,
    }


def test_a_partial_run_reports_what_it_has():
    result = full_result()
    for part in ("decode", "batch", "prefix"):
        del result[part]
    result["ratios"] = engine_report.ratios(result)
    assert [k for k, v in result["ratios"].items() if v is not None] == [
        "prefill512_over_gemm_roofline"]
    markdown = engine_report.render_markdown(result)
    assert "## Prefill" in markdown and "## Batched decode" not in markdown
    assert "| single-stream decode ÷ memory floor | - |" in markdown


def test_the_report_names_every_ratio_and_why_a_part_is_missing(tmp_path):
    result = full_result()
    result["ratios"] = engine_report.ratios(result)
    markdown = engine_report.render_markdown(result)
    for label in engine_report.RATIOS.values():
        assert label in markdown
    assert "| 32 | 150.0 | 100.0 | 1.50 | 0.38 |" in markdown
    assert "Decode role: not available: no prefix cache." in markdown
    assert engine_report.render_plot(result, tmp_path / "engine.png")
    assert (tmp_path / "engine.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("change, words", [
    ({"parts": ("decode", "bogus")}, ["parts", "decode, batch, prefill, prefix", "bogus"]),
    ({"parts": ()}, ["parts", "non-empty"]),
    ({"num_new_tokens": 1}, ["num_new_tokens", ">= 2"]),
    ({"num_repeats": 0}, ["num_repeats", "> 0"]),
    ({"concurrency": (8, 0)}, ["concurrency", "positive"]),
    ({"num_threads": 0}, ["num_threads", "> 0"]),
])
def test_config_errors_name_the_field(change, words):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(EngineBenchConfig(), **change)
    for word in words:
        assert word in str(info.value)
