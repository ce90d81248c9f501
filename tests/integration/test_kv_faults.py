"""Faults in the KV hand-off, with real worker processes (`python -m prefill_worker|decode_worker`)
and a router in this process: a prefill worker killed (SIGKILL) mid-transfer, a corrupted chunk, a
decode worker killed mid-transfer. The kills are tried on both data paths: through a shared-memory
ring (what a prefill worker uses for a decode worker on its host) and in the gRPC stream
(--no-kv-shared-memory, as to another host). Each request either completes token-identical to
transformers' greedy generate() or fails with a clear error, and afterwards the surviving workers'
free KV block counts are back at their starting values within the decode lease.

To interrupt a transfer in its middle, the prefill workers cut KV into one-token chunks (the
smallest chunk: --kv-ring-slot-bytes or --kv-chunk-bytes = one token of one layer) and the prompts
are long enough that a push is ~1000 chunks and lasts about a second, well inside the decode lease;
the ring's prefill worker also computes one token a step (--max-num-batched-tokens 1), as a ring
alone would move those chunks in milliseconds. The signal that a push is under way is the receiving
decode worker's baton_kv_transfer_bytes_total, scraped from its metrics endpoint (~10 ms a scrape):
the receiver adds a chunk's bytes only after it validated and wrote that chunk, so "at least a
quarter and below the prompt's KV size" means some KV landed and some is still to come; the kill
follows the reading within milliseconds, a small part of the push. (The prefill side's own counter
is no such signal: gRPC takes the whole stream into its buffers long before the decode worker has
read it.)
"""

from __future__ import annotations

import contextlib
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest
import torch

from baton.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    kvtransfer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from baton.wire import sampling_to_proto
from engine.config import ModelConfig
from engine.request import SamplingParams
from kvtransfer.codec import KVGeometry
from kvtransfer.sender import iter_chunks
from tests.integration.test_workers import wait_for
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.processes import WorkerProcess, WorkerProcesses

# Each test alone waits ~5-15 s for its worker processes to start.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEASE_S = 4.0  # the decode workers' KV lease: long enough for one slow push, short for a test
MAX_TOKENS = 8
SLOW_PROMPT_LEN = 512  # tokens: a push of 1024 one-token chunks, about a second here
KV_BYTES = "baton_kv_transfer_bytes_total"


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model("llama-gqa")


@pytest.fixture(scope="module")
def geometry(model_dir) -> KVGeometry:
    mc = ModelConfig.from_dir(model_dir)
    return KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.float32)


@pytest.fixture(scope="module")
def workers(model_dir, geometry, tmp_path_factory):
    """workers(*ids) -> the running workers with those ids. All start at once (start-up is most of
    this module's time); one a test killed is started again when a later test asks for it. Ends
    them all (SIGTERM, then SIGKILL) when the module is done."""
    lease = {"kv_lease_s": LEASE_S}
    one_token = geometry.bytes_per_token_layer
    specs = {
        # one token a step: the prefill paces the push through the ring over ~a second
        "prefill-0": ("prefill", {"kv_ring_slot_bytes": one_token, "max_num_batched_tokens": 1}),
        "prefill-stream": ("prefill", {"kv_chunk_bytes": one_token, "kv_shared_memory": False}),
        # With equal loads the router picks the smaller worker id: decode-0 before decode-1.
        "decode-0": ("decode", lease),
        "decode-1": ("decode", lease),
    }
    with WorkerProcesses(model_dir, tmp_path_factory.mktemp("worker-logs")) as procs:
        def running(*worker_ids: str) -> list[WorkerProcess]:
            return procs.ensure(*[(specs[i][0], i, specs[i][1]) for i in worker_ids])

        running(*specs)
        yield running


@contextlib.contextmanager
def router_over(model_dir, workers: list[WorkerProcess]):
    from router.config import RouterConfig
    from router.registry import StaticWorkerDirectory
    from router.routing import RoutingPolicy
    from router.server import Router

    config = RouterConfig(model_name="tiny", model_dir=str(model_dir), http_port=0, grpc_port=0,
                          routing=RoutingPolicy(disaggregation="always"))
    with Router(config, StaticWorkerDirectory([w.info() for w in workers])) as router:
        yield router


def generate(router, prompt: list[int]) -> list[int]:
    """Greedy tokens through the router's gRPC API."""
    with grpc.insecure_channel(router.grpc_address) as channel:
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=prompt), temperature=0.0,
            max_tokens=MAX_TOKENS, ignore_eos=True)
        return [t for msg in generation_pb2_grpc.GenerationStub(channel).Generate(
            request, timeout=60) for t in msg.token_ids]


def slow_prompt(seed: int, length: int = SLOW_PROMPT_LEN) -> list[int]:
    """Distinct seeds differ in the first token, so no prompt hits another's cached blocks."""
    return [(7 * j + seed) % 300 + 3 for j in range(length)]


def kill_mid_transfer(victim: WorkerProcess, receiver: WorkerProcess, num_bytes_before: float,
                      num_bytes_total: int, request: Future) -> float:
    """SIGKILL victim once receiver holds a quarter to all-but-the-end of a transfer's KV; returns
    the bytes received at that moment."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        received = receiver.metric(KV_BYTES) - num_bytes_before
        assert received < num_bytes_total, "the push ended before it could be interrupted"
        if received >= num_bytes_total // 4:
            victim.kill()
            return received
        assert not request.done(), f"the request ended before the kill: {request.exception()}"
        time.sleep(0.01)
    raise AssertionError(f"no KV reached {receiver.worker_id} in 30 s:\n{receiver.log_tail()}")


def test_corrupt_chunk_fails_the_transfer_with_a_checksum_error(workers, model_dir, geometry):
    prefill, decode = workers("prefill-0", "decode-1")
    free_before = decode.num_free_blocks()
    prompt = slow_prompt(seed=2, length=40)
    sampling = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True))
    stream = worker_pb2_grpc.DecodeStub(decode.channel()).Generate(worker_pb2.DecodeRequest(
        request_id=uuid.uuid4().hex, prompt_token_ids=prompt, sampling=sampling,
        prefill_mode=worker_pb2.PREFILL_MODE_REMOTE, transfer_id="corrupt-transfer"), timeout=30)
    try:
        reserved = next(stream).reserved
        assert reserved.num_cached_tokens == 0
        assert wait_for(lambda: decode.num_free_blocks() < free_before, 5)
        # k, v: [layers, tokens, kv_heads, head_dim]
        kv = torch.randn(geometry.num_layers, len(prompt), geometry.num_kv_heads, geometry.head_dim)
        chunk = next(iter_chunks(
            transfer_id="corrupt-transfer", attempt=0, geometry=geometry, token_start=0,
            token_end=len(prompt), read_kv=lambda l0, l1, t0, t1: (kv[l0:l1, t0:t1],) * 2,
            first_token_id=5))
        chunk.crc32c ^= 1
        with pytest.raises(grpc.RpcError) as pushed:
            kvtransfer_pb2_grpc.KVTransferStub(decode.channel()).Push(iter([chunk]), timeout=10)
        assert pushed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "checksum" in pushed.value.details()
        with pytest.raises(grpc.RpcError) as generated:
            list(stream)
        assert generated.value.code() == grpc.StatusCode.ABORTED
        assert "KV transfer failed (checksum)" in generated.value.details()
    finally:
        stream.cancel()
    assert wait_for(lambda: decode.num_free_blocks() == free_before, LEASE_S), \
        (decode.num_free_blocks(), free_before)
    # the next request takes the whole remote path on the same workers
    good = slow_prompt(seed=4, length=60)
    received_before = decode.metric(KV_BYTES)
    with router_over(model_dir, [prefill, decode]) as router:
        assert generate(router, good) == hf_generate_greedy(model_dir, good, MAX_TOKENS)
    assert decode.metric(KV_BYTES) - received_before == len(good) * geometry.bytes_per_token


# Each case its own prompt: the decode worker that survives one case caches that case's prompt.
@pytest.mark.parametrize(("prefill_id", "seed"), [("prefill-0", 3), ("prefill-stream", 13)])
def test_decode_worker_killed_mid_transfer_retries_on_another_decode_worker(
        workers, model_dir, geometry, prefill_id, seed):
    prefill, victim, decode = workers(prefill_id, "decode-0", "decode-1")
    prompt = slow_prompt(seed=seed)
    num_bytes_total = len(prompt) * geometry.bytes_per_token
    free_before = {w.worker_id: w.num_free_blocks() for w in (prefill, decode)}
    received_before = decode.metric(KV_BYTES)
    with router_over(model_dir, [prefill, victim, decode]) as router, \
            ThreadPoolExecutor(1) as pool:
        request = pool.submit(generate, router, prompt)
        kill_mid_transfer(victim, victim, victim.metric(KV_BYTES), num_bytes_total, request)
        tokens = request.result(timeout=60)
    # What the router does today: the prefill worker's push fails (UNAVAILABLE), so the router
    # falls back to a local prefill on the same decode worker; that one is gone (UNAVAILABLE), so
    # the request moves to the other decode worker, remote prefill again, before any token.
    assert tokens == hf_generate_greedy(model_dir, prompt, MAX_TOKENS)
    assert victim.proc.returncode == -9
    assert decode.metric(KV_BYTES) - received_before == num_bytes_total
    for worker in (prefill, decode):
        assert wait_for(lambda w=worker: w.num_free_blocks() == free_before[w.worker_id],
                        LEASE_S), (worker.worker_id, worker.num_free_blocks(), free_before)


@pytest.mark.parametrize(("prefill_id", "seed"), [("prefill-0", 1), ("prefill-stream", 11)])
def test_prefill_worker_killed_mid_transfer_falls_back_to_local_prefill(
        workers, model_dir, geometry, prefill_id, seed):
    victim, decode = workers(prefill_id, "decode-1")
    prompt = slow_prompt(seed=seed)
    num_bytes_total = len(prompt) * geometry.bytes_per_token
    free_before = decode.num_free_blocks()
    received_before = decode.metric(KV_BYTES)
    with router_over(model_dir, [victim, decode]) as router, ThreadPoolExecutor(1) as pool:
        request = pool.submit(generate, router, prompt)
        received_at_kill = kill_mid_transfer(victim, decode, received_before, num_bytes_total,
                                             request)
        tokens = request.result(timeout=60)
    assert victim.proc.returncode == -9
    # Today's router does not retry on another prefill worker: the same decode worker drops the
    # partial KV and prefills locally, so no further KV arrives there.
    assert tokens == hf_generate_greedy(model_dir, prompt, MAX_TOKENS)
    assert received_at_kill <= decode.metric(KV_BYTES) - received_before < num_bytes_total
    assert wait_for(lambda: decode.num_free_blocks() == free_before, LEASE_S), \
        (decode.num_free_blocks(), free_before)


def test_sigterm_stops_a_worker_gracefully(workers):
    (decode,) = workers("decode-1")
    assert decode.terminate() == 0
    assert "decode worker decode-1 stopped" in decode.log_tail()
