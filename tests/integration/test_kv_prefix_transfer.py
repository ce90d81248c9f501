"""A prompt sharing a 1024-token prefix with an earlier one moves only its suffix's KV.

The decode worker's radix cache holds the earlier request's 64 full blocks; it reserves only the
rest and reports 1024 cached tokens, the prefill worker sends positions from there on, and the
bytes counter grows by exactly the suffix's KV. Both outputs stay token-identical to transformers.
"""

import random

import pytest

from engine.config import ModelConfig
from tests.integration.test_workers import GREEDY, disaggregated, kv_bytes
from tests.support.models import hf_generate_greedy, make_tiny_model
from tests.support.workers import running_workers

pytestmark = pytest.mark.integration

PREFIX_TOKENS = 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The presets stop at 1024 positions; this one has room for the prefix and a suffix.
    return make_tiny_model(tmp_path_factory.mktemp("tiny-2k"), max_position_embeddings=2048)


def test_a_shared_1024_token_prefix_moves_no_kv(model_dir):
    mc = ModelConfig.from_dir(model_dir)
    bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4  # K and V, float32
    rng = random.Random(5)
    prefix = [rng.randrange(3, mc.vocab_size) for _ in range(PREFIX_TOKENS)]
    first = prefix + [rng.randrange(3, mc.vocab_size) for _ in range(40)]
    second = prefix + [rng.randrange(3, mc.vocab_size) for _ in range(57)]
    with running_workers(model_dir) as ([prefill], [decode]):
        before = kv_bytes(decode.registry)
        assert disaggregated(prefill, decode, first) == hf_generate_greedy(
            model_dir, first, GREEDY.max_tokens)
        assert kv_bytes(decode.registry) - before == len(first) * bytes_per_token
        skipped = decode.registry.get_sample_value(
            "baton_kv_transfer_skipped_blocks_total",
            {"model": "tiny", "role": "decode", "worker": "decode-0"})

        before = kv_bytes(decode.registry)
        assert disaggregated(prefill, decode, second) == hf_generate_greedy(
            model_dir, second, GREEDY.max_tokens)
        assert kv_bytes(decode.registry) - before == (len(second) - PREFIX_TOKENS) * bytes_per_token
        assert decode.registry.get_sample_value(
            "baton_kv_transfer_skipped_blocks_total",
            {"model": "tiny", "role": "decode", "worker": "decode-0"},
        ) - skipped == PREFIX_TOKENS // decode.engine.block_size
