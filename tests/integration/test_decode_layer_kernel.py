"""The one-call-per-layer CPU decode path of LlamaModel against its per-operation path.

Both read the same paged pool through the same block tables; the per-operation path is the one
every other test compares with transformers. Norms, projections, rope and the KV store run the
same float operations on both paths, so the first layer's K/V must be bitwise equal; after it the
paths differ only by their exp inside silu.
"""

import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.models import cpu_kernels
from engine.models.attention import AttentionMetadata
from engine.models.llama import LlamaModel
from tests.support.models import tiny_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(cpu_kernels.load() is None, reason="CPU kernels unavailable here"),
]


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mqa", "llama-mha-tied", "qwen2-bias"])
@pytest.mark.parametrize("context_lens", [[1], [17, 3], [1, 16, 33, 5, 64]])
def test_decode_layer_kernel_matches_the_per_operation_path(monkeypatch, name, context_lens):
    engine = LLMEngine(EngineConfig(model=str(tiny_model(name)), kv_cache_memory_bytes=1 << 20))
    model, kv = engine.runner.model, engine.runner.kv_cache
    rng = random.Random(len(context_lens))
    torch.manual_seed(len(context_lens))
    for cache in (*kv.k_caches, *kv.v_caches):  # some context already in the pool
        cache.normal_()
    blocks = rng.sample(range(kv.num_blocks), sum(-(-n // kv.block_size) for n in context_lens))
    tables = []
    for n in context_lens:
        count = -(-n // kv.block_size)
        tables.append(blocks[:count])
        blocks = blocks[count:]
    meta = AttentionMetadata.build(
        [1] * len(context_lens), context_lens, tables, kv.block_size, torch.device("cpu")
    )
    input_ids = torch.tensor([rng.randrange(model.args.vocab_size) for _ in context_lens])

    def run() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        k_caches = [c.clone() for c in kv.k_caches]
        v_caches = [c.clone() for c in kv.v_caches]
        with torch.inference_mode():
            hidden = model(input_ids, meta, k_caches, v_caches)
        return hidden, k_caches, v_caches

    calls = []
    decode_layer = cpu_kernels.CpuKernels.decode_layer
    monkeypatch.setattr(cpu_kernels.CpuKernels, "decode_layer",
                        lambda *args: calls.append(1) or decode_layer(*args))
    fused, fused_k, fused_v = run()
    assert len(calls) == model.args.num_layers  # one kernel call per layer
    monkeypatch.setattr(LlamaModel, "_decode_layer_kernels", lambda *args: None)
    expected, expected_k, expected_v = run()
    assert len(calls) == model.args.num_layers
    # The first layer's K/V come from the embeddings through the same float ops on both paths.
    assert torch.equal(fused_k[0], expected_k[0]) and torch.equal(fused_v[0], expected_v[0])
    for got, want in zip(fused_k + fused_v, expected_k + expected_v):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_prefill_and_mixed_batches_keep_the_per_operation_path(monkeypatch):
    engine = LLMEngine(EngineConfig(model=str(tiny_model("llama-gqa")), kv_cache_memory_bytes=1 << 20))
    model = engine.runner.model
    meta = AttentionMetadata.build([1, 4], [9, 4], [[0], [1]], 16, torch.device("cpu"))
    x = torch.zeros(5, model.args.dim)
    assert model._decode_layer_kernels(x, meta, engine.runner.kv_cache.k_caches[0]) is None
    decode_only = AttentionMetadata.build([1, 1], [9, 4], [[0], [1]], 16, torch.device("cpu"))
    assert model._decode_layer_kernels(x[:2], decode_only, engine.runner.kv_cache.k_caches[0])
    assert model._decode_layer_kernels(x[:2].double(), decode_only,
                                       engine.runner.kv_cache.k_caches[0]) is None
