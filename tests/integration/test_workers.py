"""Prefill and decode workers over real gRPC on loopback, driven the way the router drives them:
KV really crosses the wire, bad chunks fail one transfer only, and nothing is stranded. Every test
runs twice: KV through shared memory (a decode worker on the prefill worker's host) and in the
gRPC stream."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
from prometheus_client import CollectorRegistry

from baton.v1 import kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from baton.wire import GRPC_OPTIONS, sampling_to_proto
from engine.config import ModelConfig
from engine.request import SamplingParams
from kvtransfer.codec import KVGeometry
from kvtransfer.sender import iter_chunks
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.workers import running_workers

pytestmark = pytest.mark.integration

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model("llama-gqa")


@pytest.fixture(scope="module", params=[True, False], ids=["shared-memory", "stream"])
def workers(model_dir, request):
    with running_workers(model_dir, kv_lease_s=2.0, kv_shared_memory=request.param) as (
            prefill, decode):
        yield prefill[0], decode[0]


def kv_bytes(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("baton_kv_transfer_bytes_total",
                                     {"model": "tiny", "role": "decode", "worker": "decode-0"}) or 0.0


def disaggregated(prefill, decode, prompt: list[int], sampling=GREEDY) -> list[int]:
    """The router's side of one request: reserve on D, prefill on P, stream from D."""
    rid = uuid.uuid4().hex
    transfer_id = uuid.uuid4().hex
    with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as d_chan, \
            grpc.insecure_channel(prefill.address, options=GRPC_OPTIONS) as p_chan:
        stream = worker_pb2_grpc.DecodeStub(d_chan).Generate(worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(sampling),
            prefill_mode=worker_pb2.PREFILL_MODE_REMOTE, transfer_id=transfer_id), timeout=60)
        reserved = next(stream).reserved
        assert reserved.transfer_id == transfer_id
        reply = worker_pb2_grpc.PrefillStub(p_chan).Prefill(worker_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(sampling),
            transfer_id=transfer_id, decode_address=decode.address,
            num_skip_tokens=reserved.num_cached_tokens), timeout=60)
        tokens = [reply.first_token_id]
        for msg in stream:
            tokens.extend(msg.tokens.token_ids)
            if msg.tokens.finish_reason:
                break
    return tokens


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_disaggregated_output_equals_hf_and_kv_bytes_match_the_model_shape(workers, model_dir):
    prefill, decode = workers
    prompt = list(range(3, 3 + 37))
    before = kv_bytes(decode.registry)
    tokens = disaggregated(prefill, decode, prompt)
    assert tokens == hf_generate_greedy(model_dir, prompt, GREEDY.max_tokens)
    through_ring, _ = prefill._ring_ok.get(decode.address, (False, 0.0))  # the check's answer
    assert through_ring is (prefill._rings is not None)
    mc = ModelConfig.from_dir(model_dir)
    expected = len(prompt) * 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4  # float32
    assert kv_bytes(decode.registry) - before == expected


def test_concurrent_disaggregated_requests(workers, model_dir):
    prefill, decode = workers
    prompts = [[(7 * i + j) % 300 + 3 for j in range(n)] for i, n in enumerate([1, 5, 16, 17, 64, 130, 255, 300])]
    results: dict[int, list[int]] = {}

    def run(i):
        results[i] = disaggregated(prefill, decode, prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, prompt in enumerate(prompts):
        assert results[i] == hf_generate_greedy(model_dir, prompt, GREEDY.max_tokens), i


def test_corrupt_chunk_fails_that_request_only_and_frees_its_blocks(workers, model_dir):
    prefill, decode = workers
    free_before = decode.load().num_free_blocks
    mc = ModelConfig.from_dir(model_dir)
    prompt = list(range(3, 40))
    rid, transfer_id = "corrupt-req", "corrupt-transfer"
    with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as chan:
        stream = worker_pb2_grpc.DecodeStub(chan).Generate(worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling_to_proto(GREEDY),
            prefill_mode=worker_pb2.PREFILL_MODE_REMOTE, transfer_id=transfer_id), timeout=30)
        num_cached = next(stream).reserved.num_cached_tokens  # an earlier test's blocks may hit
        assert decode.load().num_free_blocks < free_before
        import torch
        geom = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.float32)
        k = torch.randn(mc.num_layers, len(prompt), mc.num_kv_heads, mc.head_dim)
        chunks = list(iter_chunks(transfer_id=transfer_id, attempt=0, geometry=geom,
                                  token_start=num_cached, token_end=len(prompt), read_kv=lambda a, b, c, d: (k[a:b, c:d], k[a:b, c:d]),
                                  first_token_id=5))
        chunks[0].crc32c ^= 1
        with pytest.raises(grpc.RpcError) as info:
            kvtransfer_pb2_grpc.KVTransferStub(chan).Push(iter(chunks), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "checksum" in info.value.details()
    assert wait_for(lambda: decode.load().num_free_blocks == free_before)
    # a good request right after is unaffected
    good = list(range(10, 30))
    assert disaggregated(prefill, decode, good) == hf_generate_greedy(model_dir, good, GREEDY.max_tokens)


def test_reservation_without_kv_expires_and_frees_blocks(workers):
    _prefill, decode = workers
    free_before = decode.load().num_free_blocks
    with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as chan:
        stream = worker_pb2_grpc.DecodeStub(chan).Generate(worker_pb2.DecodeRequest(
            request_id="never-pushed", prompt_token_ids=list(range(3, 60)),
            sampling=sampling_to_proto(GREEDY), prefill_mode=worker_pb2.PREFILL_MODE_REMOTE,
            transfer_id="never"), timeout=30)
        next(stream)
        assert decode.load().num_free_blocks < free_before
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert "lease" in info.value.details()
    assert wait_for(lambda: decode.load().num_free_blocks == free_before)


def test_client_gone_frees_blocks(workers):
    _prefill, decode = workers
    free_before = decode.load().num_free_blocks
    with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as chan:
        stream = worker_pb2_grpc.DecodeStub(chan).Generate(worker_pb2.DecodeRequest(
            request_id="leaves", prompt_token_ids=list(range(3, 60)),
            sampling=sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)),
            prefill_mode=worker_pb2.PREFILL_MODE_LOCAL), timeout=30)
        next(stream)
        stream.cancel()
    assert wait_for(lambda: decode.load().num_free_blocks == free_before and decode.load().num_running == 0)


def test_bad_sampling_is_invalid_argument(workers):
    _prefill, decode = workers
    with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as chan:
        msg = sampling_to_proto(GREEDY)
        msg.top_p = 1.5
        with pytest.raises(grpc.RpcError) as info:
            list(worker_pb2_grpc.DecodeStub(chan).Generate(worker_pb2.DecodeRequest(
                request_id="bad", prompt_token_ids=[3, 4], sampling=msg,
                prefill_mode=worker_pb2.PREFILL_MODE_LOCAL), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_p" in info.value.details()


def test_transfer_id_in_use_is_refused_and_frees_its_reservation(workers):
    _prefill, decode = workers
    free_before = decode.load().num_free_blocks
    request = {"prompt_token_ids": list(range(3, 40)), "sampling": sampling_to_proto(GREEDY),
               "prefill_mode": worker_pb2.PREFILL_MODE_REMOTE, "transfer_id": "shared-transfer"}
    with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as chan:
        stub = worker_pb2_grpc.DecodeStub(chan)
        first = stub.Generate(worker_pb2.DecodeRequest(request_id="a", **request), timeout=30)
        next(first)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(worker_pb2.DecodeRequest(request_id="b", **request), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "transfer_id" in info.value.details()
        first.cancel()
    assert wait_for(lambda: decode.load().num_free_blocks == free_before)


def test_engine_metrics_count_steps_and_prefix_cache_lookups(workers):
    prefill, decode = workers

    def sample(worker, name, **extra):
        labels = {"model": "tiny", "role": worker.role, "worker": worker.worker_id, **extra}
        return worker.registry.get_sample_value(name, labels) or 0.0

    steps = "baton_engine_step_seconds_count"
    before = {
        "prefill_steps": sample(prefill, steps, phase="prefill"),
        "decode_steps": sample(decode, steps, phase="decode"),
        "queries": sample(prefill, "baton_prefix_cache_queries_total"),
    }
    prompt = [11 + (5 * j) % 200 for j in range(40)]
    disaggregated(prefill, decode, prompt)
    # The loop observes a step right after delivering its outputs: allow it a moment.
    assert wait_for(lambda: sample(decode, steps, phase="decode") >= before["decode_steps"] + 10)
    assert sample(prefill, steps, phase="prefill") >= before["prefill_steps"] + 1
    assert sample(prefill, "baton_prefix_cache_queries_total") > before["queries"]
    for worker in (prefill, decode):
        assert worker.registry.get_sample_value(
            "baton_num_preemptions_total",
            {"model": "tiny", "role": worker.role, "worker": worker.worker_id},
        ) == 0.0


def test_no_room_for_a_ring_pushes_in_the_stream(workers, model_dir, monkeypatch):
    prefill, decode = workers
    if prefill._rings is None:
        pytest.skip("this worker pushes in the stream anyway")

    asked = []

    def full(*_args):
        asked.append(1)
        raise OSError(28, "No space left on device")  # a small /dev/shm, full

    monkeypatch.setattr(prefill._rings, "acquire", full)
    prompt = [17 + (3 * j) % 250 for j in range(30)]
    before = kv_bytes(decode.registry)
    assert disaggregated(prefill, decode, prompt) == hf_generate_greedy(
        model_dir, prompt, GREEDY.max_tokens)
    assert asked  # it wanted a ring, got none, and pushed in the stream
    mc = ModelConfig.from_dir(model_dir)
    assert kv_bytes(decode.registry) - before == (
        len(prompt) * 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4)
