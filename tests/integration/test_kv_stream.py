"""Layer-wise KV streaming: the engine's KVStream, and the prefill worker pushing each layer while
the engine computes the next.

The stream must give exactly the K/V that read_kv gives after the prefill, become readable chunk by
chunk during a chunked prefill, and refuse every read once the request's blocks are freed. Through
real workers, KV must reach the decode worker before the prefill worker has its first token, and
the output must stay token-identical to transformers.
"""

import threading
import time
import uuid

import grpc
import pytest
import torch

from baton.v1 import worker_pb2, worker_pb2_grpc
from baton.wire import GRPC_OPTIONS, sampling_to_proto
from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.kv_cache import kv_bytes_per_token
from engine.kv_stream import KVStreamClosed
from engine.request import SamplingParams
from tests.integration.test_workers import GREEDY, disaggregated, wait_for
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.workers import running_workers

pytestmark = pytest.mark.integration

NAME = "llama-gqa"
PROMPT = [(13 * i + 5) % 300 + 3 for i in range(70)]


def engine(**overrides) -> LLMEngine:
    settings = {"kv_cache_memory_bytes": 1 << 20, "max_num_batched_tokens": 16, **overrides}
    return LLMEngine(EngineConfig(model=str(tiny_model(NAME)), **settings))


def test_stream_follows_a_chunked_prefill_and_matches_read_kv():
    eng = engine()
    eng.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=1), prefill_only=True)
    stream = eng.stream_kv("r")
    num_layers = eng.model_config.num_layers
    with pytest.raises(TimeoutError):
        stream.wait(0, 0, timeout=0.01)  # nothing computed before the first step
    eng.step()  # the first 16-token chunk
    assert [stream.wait(layer, 0, timeout=1) for layer in range(num_layers)] == [16] * num_layers
    early_k, early_v = stream.read(num_layers - 1, 0, 16)
    with pytest.raises(ValueError, match="not within the 16 computed"):
        stream.read(0, 8, 17)
    while not any(out.new_token_ids for out in eng.step()):
        pass
    for layer in range(num_layers):
        assert stream.wait(layer, 16, timeout=1) == len(PROMPT)
        k, v = stream.read(layer, 0, len(PROMPT))
        ref_k, ref_v = eng.read_kv("r", layer, layer + 1, 0, len(PROMPT))
        assert torch.equal(k, ref_k) and torch.equal(v, ref_v)
    assert torch.equal(early_k, ref_k[:, :16]) and torch.equal(early_v, ref_v[:, :16])
    eng.release("r")
    assert stream.closed
    with pytest.raises(KVStreamClosed):
        stream.read(0, 0, 1)
    with pytest.raises(KVStreamClosed):
        stream.wait(0, len(PROMPT), timeout=1)


def test_abort_closes_the_stream_and_wakes_a_waiting_reader():
    eng = engine()
    eng.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=1), prefill_only=True)
    stream = eng.stream_kv("r")
    errors = []

    def reader():
        try:
            stream.wait(0, 0, timeout=10)
        except KVStreamClosed as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.05)
    eng.abort("r")
    thread.join(5)
    assert len(errors) == 1 and not thread.is_alive()
    assert eng.num_free_blocks == eng.num_total_blocks


def test_preemption_closes_the_stream():
    # Two long prompts in a pool too small for both: the later one is preempted mid-prefill.
    mc = ModelConfig.from_dir(tiny_model(NAME))
    block_bytes = 16 * kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                          torch.float32)
    eng = engine(kv_cache_memory_bytes=6 * block_bytes, max_num_batched_tokens=64)
    assert eng.num_total_blocks == 6
    params = SamplingParams(temperature=0, max_tokens=1)
    eng.add_request("a", PROMPT[:60], params, prefill_only=True)
    eng.add_request("b", PROMPT[10:70], params, prefill_only=True)
    stream = eng.stream_kv("b")
    while eng.has_unfinished() and not stream.closed:
        eng.step()
    assert eng.stats.num_preemptions >= 1 and stream.closed


def test_stream_kv_refuses_what_it_cannot_stream():
    eng = engine()
    eng.add_request("local", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="not a prefill_only"):
        eng.stream_kv("local")
    eng.abort("local")
    eng.add_request("p", PROMPT, SamplingParams(max_tokens=1), prefill_only=True)
    eng.step()  # its first chunk: a stream would have missed it
    with pytest.raises(ValueError, match="started already"):
        eng.stream_kv("p")


def test_decode_worker_receives_kv_before_the_prefill_finishes():
    """A 16-token budget cuts the prompt into 5 prefill steps; the first chunks must be written on
    the decode side before the prefill worker samples its first token. Each step is held 20 ms
    (the tiny model computes one in about a millisecond, less than a push takes to open), as a
    real model's prefill step would take."""
    model_dir = tiny_model(NAME)
    with running_workers(model_dir, max_num_batched_tokens=16) as ([prefill], [decode]):
        first_write: list[float] = []
        first_token: list[float] = []
        write_kv, step = decode.engine.write_kv, prefill.engine.step

        def timed_write(*args):
            first_write.append(time.monotonic())
            return write_kv(*args)

        def timed_step():
            time.sleep(0.02)
            outputs = step()
            if any(out.new_token_ids for out in outputs):
                first_token.append(time.monotonic())
            return outputs

        decode.engine.write_kv = timed_write
        prefill.engine.step = timed_step
        tokens = disaggregated(prefill, decode, PROMPT)
    assert tokens == hf_generate_greedy(model_dir, PROMPT, GREEDY.max_tokens)
    assert first_write and first_token
    assert first_write[0] < first_token[0]


def test_a_prefill_aborted_mid_push_stops_it_and_frees_both_sides():
    """Abort reaches the prefill worker while it is still computing and pushing: its push stops
    (counted as "stopped"), Prefill answers UNAVAILABLE, the decode worker fails the transfer,
    and both free block counts return to their start values."""
    model_dir = tiny_model(NAME)
    with running_workers(model_dir, max_num_batched_tokens=16) as ([prefill], [decode]):
        step = prefill.engine.step

        def slow_step():  # five prefill steps of ~0.1 s: time to abort in between
            time.sleep(0.1)
            return step()

        prefill.engine.step = slow_step
        labels = {"model": "tiny", "role": "prefill", "worker": "prefill-0"}
        stopped_before = prefill.registry.get_sample_value(
            "baton_kv_transfer_failures_total", {**labels, "reason": "stopped"})
        free_prefill, free_decode = prefill.load().num_free_blocks, decode.load().num_free_blocks
        rid, transfer_id = uuid.uuid4().hex, uuid.uuid4().hex
        with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as d_chan, \
                grpc.insecure_channel(prefill.address, options=GRPC_OPTIONS) as p_chan:
            stream = worker_pb2_grpc.DecodeStub(d_chan).Generate(worker_pb2.DecodeRequest(
                request_id=rid, prompt_token_ids=PROMPT, sampling=sampling_to_proto(GREEDY),
                prefill_mode=worker_pb2.PREFILL_MODE_REMOTE, transfer_id=transfer_id), timeout=30)
            assert next(stream).reserved.num_cached_tokens == 0
            p_stub = worker_pb2_grpc.PrefillStub(p_chan)
            call = p_stub.Prefill.future(worker_pb2.PrefillRequest(
                request_id=rid, prompt_token_ids=PROMPT, sampling=sampling_to_proto(GREEDY),
                transfer_id=transfer_id, decode_address=decode.address), timeout=30)
            load = prefill.load
            assert wait_for(lambda: load().num_running + load().num_waiting > 0)
            time.sleep(0.15)  # a chunk or two computed and pushed
            assert p_stub.Abort(worker_pb2.WorkerAbortRequest(request_id=rid), timeout=5).found
            with pytest.raises(grpc.RpcError) as info:
                call.result()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "freed: aborted" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.ABORTED
        assert prefill.registry.get_sample_value(
            "baton_kv_transfer_failures_total", {**labels, "reason": "stopped"}) == stopped_before + 1
        assert wait_for(lambda: prefill.load().num_free_blocks == free_prefill)
        assert wait_for(lambda: decode.load().num_free_blocks == free_decode)


def test_a_decode_worker_without_room_refuses_the_reservation():
    """Backpressure: with its pool held by one reservation, a decode worker answers a second
    with RESOURCE_EXHAUSTED at once (nothing reserved, nothing waiting), and takes it again once
    the first is gone."""
    model_dir = tiny_model(NAME)
    mc = ModelConfig.from_dir(model_dir)
    block_bytes = 16 * kv_bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                          torch.float32)
    with running_workers(model_dir, kv_cache_memory_bytes=6 * block_bytes) as (_, [decode]):

        def reserve(chan, prompt):
            return worker_pb2_grpc.DecodeStub(chan).Generate(worker_pb2.DecodeRequest(
                request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                sampling=sampling_to_proto(GREEDY), prefill_mode=worker_pb2.PREFILL_MODE_REMOTE,
                transfer_id=uuid.uuid4().hex), timeout=10)

        with grpc.insecure_channel(decode.address, options=GRPC_OPTIONS) as chan:
            first = reserve(chan, PROMPT[:64])  # 4 of the 6 blocks
            assert next(first).HasField("reserved")
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                next(reserve(chan, PROMPT[1:65]))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - start < 2 and "KV blocks" in info.value.details()
            assert decode.load().num_waiting == 1  # only the first reservation
            first.cancel()
            assert wait_for(lambda: decode.load().num_free_blocks == 6)
            assert next(reserve(chan, PROMPT[1:65])).HasField("reserved")
