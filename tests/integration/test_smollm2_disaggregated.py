"""SmolLM2 through the whole disaggregated path (router -> prefill -> KV over gRPC -> decode):
token-identical to transformers' greedy generate() on the same float32 weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from baton.v1 import generation_pb2, generation_pb2_grpc
from engine.tokenizer import Tokenizer
from tests.support.models import hf_generate_greedy
from tests.support.workers import running_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]
MAX_TOKENS = 32


def test_three_prompts_match_hf(smollm2_dir):
    tokenizer = Tokenizer.from_dir(smollm2_dir)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]

    def generate(address, prompt):
        with grpc.insecure_channel(address) as channel:
            request = generation_pb2.GenerateRequest(
                token_ids=generation_pb2.TokenIds(ids=prompt), temperature=0.0,
                max_tokens=MAX_TOKENS, ignore_eos=True)
            return [t for msg in generation_pb2_grpc.GenerationStub(channel).Generate(
                request, timeout=300) for t in msg.token_ids]

    with (running_cluster(smollm2_dir, kv_cache_memory_bytes=128 << 20) as (router, _, _),
          ThreadPoolExecutor(len(prompts)) as pool):
        outputs = list(pool.map(lambda p: generate(router.grpc_address, p), prompts))
    for prompt, output in zip(prompts, outputs):
        assert output == hf_generate_greedy(smollm2_dir, prompt, MAX_TOKENS)
    assert "Paris" in tokenizer.decode(outputs[0])
