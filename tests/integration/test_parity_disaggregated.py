"""Whole-path parity: client -> router (gRPC Generation) -> prefill worker -> KV over gRPC ->
decode worker -> tokens back, token-identical to transformers' greedy generate() in float32, for
every tiny architecture, with prompts of 1 to 300 tokens sent concurrently."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from baton.v1 import generation_pb2, generation_pb2_grpc
from tests.support.models import TINY_MODELS, hf_generate_greedy, tiny_model
from tests.support.workers import running_cluster

pytestmark = pytest.mark.integration

PROMPT_LENGTHS = [1, 2, 15, 16, 17, 63, 150, 300]
MAX_TOKENS = 16


def prompts(vocab: int) -> list[list[int]]:
    return [[(31 * i + 7 * j) % (vocab - 10) + 5 for j in range(n)]
            for i, n in enumerate(PROMPT_LENGTHS)]


def generate(address: str, prompt: list[int]) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=prompt), temperature=0.0,
            max_tokens=MAX_TOKENS, ignore_eos=True)
        tokens: list[int] = []
        for msg in stub.Generate(request, timeout=120):
            tokens.extend(msg.token_ids)
        return tokens


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("num_prefill", [1, 0], ids=["disaggregated", "colocated"])
def test_router_path_matches_hf(name, num_prefill):
    model_dir = tiny_model(name)
    from engine.config import ModelConfig

    batch = prompts(ModelConfig.from_dir(model_dir).vocab_size)
    with running_cluster(model_dir, num_prefill=num_prefill) as (router, prefill, _decode):
        with ThreadPoolExecutor(len(batch)) as pool:
            outputs = list(pool.map(lambda p: generate(router.grpc_address, p), batch))
        if num_prefill:
            sent = prefill[0].registry.get_sample_value(
                "baton_kv_transfer_bytes_total",
                {"model": "tiny", "role": "prefill", "worker": "prefill-0"})
            assert sent > 0  # the KV really crossed the wire
    for prompt, output in zip(batch, outputs):
        assert output == hf_generate_greedy(model_dir, prompt, MAX_TOKENS), len(prompt)
