"""KV-transfer metrics of real in-process workers, read from their registries after real transfers
over loopback gRPC: bytes, seconds, prefix blocks not sent, failures and refused pushes by reason."""

from __future__ import annotations

import grpc
import pytest
import torch

from baton.v1 import kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.wire import GRPC_OPTIONS, sampling_to_proto
from engine.config import ModelConfig
from kvtransfer.codec import KVGeometry
from kvtransfer.receiver import FAILURE_REASONS, REFUSAL_REASONS
from kvtransfer.sender import iter_chunks
from tests.integration import test_workers as shared
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.workers import running_workers

pytestmark = pytest.mark.integration

FAILURES = "baton_kv_transfer_failures_total"
REFUSED = "baton_kv_transfer_refused_pushes_total"


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model("llama-gqa")


@pytest.fixture(scope="module")
def workers(model_dir):
    with running_workers(model_dir) as (prefill, decode):
        yield prefill[0], decode[0]


def sample(worker, name: str, **extra) -> float | None:
    labels = {"model": "tiny", "role": worker.role, "worker": worker.worker_id, **extra}
    return worker.registry.get_sample_value(name, labels)


def by_reason(worker, name: str, reasons) -> dict[str, float | None]:
    return {r.value: sample(worker, name, reason=r.value) for r in reasons}


def test_every_reason_shows_zero_before_the_first_failure(workers):
    _prefill, decode = workers
    assert by_reason(decode, FAILURES, FAILURE_REASONS) == {r.value: 0.0 for r in FAILURE_REASONS}
    assert by_reason(decode, REFUSED, REFUSAL_REASONS) == {r.value: 0.0 for r in REFUSAL_REASONS}
    assert {r.value for r in FAILURE_REASONS} >= {"checksum", "bad_range", "bad_shape", "expired",
                                                  "incomplete"}


def test_remote_requests_count_bytes_seconds_and_skipped_prefix_blocks(workers, model_dir):
    prefill, decode = workers
    mc = ModelConfig.from_dir(model_dir)
    bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4  # K and V, float32
    block_size = decode.engine.block_size

    def counters() -> dict[str, float]:
        return {
            "decode_bytes": sample(decode, "baton_kv_transfer_bytes_total"),
            "prefill_bytes": sample(prefill, "baton_kv_transfer_bytes_total"),
            "seconds_count": sample(decode, "baton_kv_transfer_seconds_count"),
            "seconds_sum": sample(decode, "baton_kv_transfer_seconds_sum"),
            "skipped_blocks": sample(decode, "baton_kv_transfer_skipped_blocks_total"),
            "cache_hits": sample(decode, "baton_prefix_cache_hits_total"),
        }

    def request(prompt: list[int]) -> dict[str, float]:
        before = counters()
        tokens = shared.disaggregated(prefill, decode, prompt)
        assert tokens == hf_generate_greedy(model_dir, prompt, shared.GREEDY.max_tokens)
        after = counters()
        return {name: after[name] - before[name] for name in after}

    # 3 full blocks and 5 tokens; the second prompt shares its first 40 tokens: 2 full blocks
    first = [3 + (11 * j) % 290 for j in range(3 * block_size + 5)]
    second = first[:40] + [5 + (13 * j) % 280 for j in range(20)]
    delta = request(first)
    assert delta["skipped_blocks"] == 0 and delta["cache_hits"] == 0
    assert delta["decode_bytes"] == delta["prefill_bytes"] == len(first) * bytes_per_token
    assert delta["seconds_count"] == 1 and delta["seconds_sum"] > 0

    delta = request(second)
    num_cached = 2 * block_size
    assert delta["skipped_blocks"] == 2
    assert delta["cache_hits"] == num_cached
    assert delta["decode_bytes"] == delta["prefill_bytes"] == (len(second) - num_cached) * bytes_per_token
    assert delta["seconds_count"] == 1
    assert by_reason(decode, FAILURES, FAILURE_REASONS) == {r.value: 0.0 for r in FAILURE_REASONS}


def test_corrupt_chunk_counts_one_checksum_failure_and_frees_its_blocks(workers):
    _prefill, decode = workers
    free_before = decode.load().num_free_blocks
    failures_before = by_reason(decode, FAILURES, FAILURE_REASONS)
    refused_before = by_reason(decode, REFUSED, REFUSAL_REASONS)
    seconds_before = sample(decode, "baton_kv_transfer_seconds_count")
    mc = decode.engine.model_config
    geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, decode.engine.kv_dtype)
    prompt = [7 + (17 * j) % 270 for j in range(45)]
    transfer_id = "metrics-corrupt-transfer"
    with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as chan:
        stream = worker_pb2_grpc.DecodeStub(chan).Generate(worker_pb2.DecodeRequest(
            request_id="metrics-corrupt", prompt_token_ids=prompt,
            sampling=sampling_to_proto(shared.GREEDY), prefill_mode=worker_pb2.PREFILL_MODE_REMOTE,
            transfer_id=transfer_id), timeout=30)
        num_cached = next(stream).reserved.num_cached_tokens
        assert decode.load().num_free_blocks < free_before
        # k, v: [layers, tokens, kv_heads, head_dim]
        k = torch.randn(mc.num_layers, len(prompt), mc.num_kv_heads, mc.head_dim)

        def chunks():
            return list(iter_chunks(
                transfer_id=transfer_id, attempt=0, geometry=geometry, token_start=num_cached,
                token_end=len(prompt), read_kv=lambda l0, l1, t0, t1: (k[l0:l1, t0:t1], k[l0:l1, t0:t1]),
                first_token_id=5))

        push = kvtransfer_pb2_grpc.KVTransferStub(chan).Push
        corrupt = chunks()
        corrupt[1].crc32c ^= 1
        with pytest.raises(grpc.RpcError) as info:
            push(iter(corrupt), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert "checksum" in info.value.details()
        # a push to the failed transfer is refused on its own and fails nothing more
        with pytest.raises(grpc.RpcError) as info:
            push(iter(chunks()), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert shared.wait_for(lambda: decode.load().num_free_blocks == free_before)
    expected = dict(failures_before, checksum=failures_before["checksum"] + 1)
    assert by_reason(decode, FAILURES, FAILURE_REASONS) == expected
    expected = dict(refused_before, unknown_transfer=refused_before["unknown_transfer"] + 1)
    assert by_reason(decode, REFUSED, REFUSAL_REASONS) == expected
    assert sample(decode, "baton_kv_transfer_seconds_count") == seconds_before
