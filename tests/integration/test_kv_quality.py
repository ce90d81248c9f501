"""baton.bench.kv_quality on a tiny model: the measurement is exact where nothing is lost (two
uncompressed transfers decode identically, logits equal), and reports int8's loss and bytes."""

from __future__ import annotations

import pytest
import torch

from baton.bench.kv_quality import decode_pair, measure_int8_quality
from baton.bench.prefix import prefill_role
from engine.config import EngineConfig
from engine.engine import LLMEngine
from tests.support.models import tiny_model

pytestmark = pytest.mark.integration


def test_decode_pair_is_exact_without_loss_and_sees_int8s():
    model_dir = tiny_model("llama-gqa")
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32",
                          kv_cache_memory_bytes=8 << 20, enable_prefix_caching=False)
    prefill, decode = LLMEngine(config), LLMEngine(config)
    prompt = [(11 * j) % 300 + 5 for j in range(40)]
    source = prefill_role(prefill, prompt)
    logits: list[torch.Tensor] = []
    decode.runner.model.lm_head.register_forward_hook(
        lambda module, inputs, output: logits.append(output.detach().float().clone()))

    (a, b), diff, (bytes_a, bytes_b) = decode_pair(decode, prompt, source, ("none", "none"), 6,
                                                   logits)
    assert len(a) == 6 and a == b and bytes_a == bytes_b
    assert diff.shape == (6, decode.model_config.vocab_size) and torch.count_nonzero(diff) == 0

    (plain, _), diff, (bytes_plain, bytes_int8) = decode_pair(decode, prompt, source,
                                                              ("none", "int8"), 6, logits)
    assert plain == a
    assert 0 < diff[0].max() < 1.0  # int8 moves the logits, a little
    assert bytes_plain == bytes_a and bytes_int8 <= 0.3 * bytes_plain


def test_measure_int8_quality_reports_agreement_logits_and_bytes():
    result = measure_int8_quality(tiny_model("llama-gqa"), num_prompts=4, num_tokens=8, seed=1)
    assert result["num_prompts"] == 4 and result["num_tokens"] == 8
    assert set(result["by_kind"]) == {"chat", "random"}
    assert sum(k["num_identical"] for k in result["by_kind"].values()) == result["num_identical"]
    assert result["share_identical"] <= result["mean_share_before_divergence"] <= 1.0
    assert 0 < result["max_abs_logit_diff_first_step"] <= result["max_abs_logit_diff_teacher_forced"]
    assert result["max_abs_logit_diff_teacher_forced"] < result["max_abs_logit"]
    assert 0.25 <= result["bytes_ratio"] <= 0.3
