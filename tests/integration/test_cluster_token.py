"""The cluster token (baton/cluster_token.py): workers that have one serve only calls carrying it,
so the router and the prefill workers of their cluster get through (KV push and ring check
included) and anyone else gets UNAUTHENTICATED; health checks stay open."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import baton
from baton.cluster_token import token_channel
from baton.v1 import kvtransfer_pb2, kvtransfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.workers import running_cluster

pytestmark = pytest.mark.integration

TOKEN = "cluster-secret"


@pytest.fixture(scope="module")
def cluster():
    model_dir = tiny_model("llama-gqa")
    with running_cluster(model_dir, cluster_token=TOKEN) as (router, prefill, decode):
        yield model_dir, router, prefill[0], decode[0]


def test_the_cluster_serves_with_its_token(cluster):
    model_dir, router, _, decode = cluster
    prompt = [(5 * j) % 200 + 3 for j in range(30)]
    with baton.Client(router.grpc_address, timeout=60) as client:
        result = client.generate(token_ids=prompt, temperature=0, max_tokens=8, ignore_eos=True)
    assert list(result.token_ids) == hf_generate_greedy(model_dir, prompt, 8)
    assert decode.registry.get_sample_value(  # the KV came from the prefill worker
        "baton_kv_transfer_bytes_total",
        {"model": "tiny", "role": "decode", "worker": "decode-0"}) > 0


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_call_without_the_token_is_refused(cluster, role):
    _, _, prefill, decode = cluster
    worker = prefill if role == "prefill" else decode
    stub_cls = worker_pb2_grpc.PrefillStub if role == "prefill" else worker_pb2_grpc.DecodeStub
    for token in (None, "wrong"):
        with token_channel(worker.address, token) as channel:
            with pytest.raises(grpc.RpcError) as info:
                stub_cls(channel).GetLoad(worker_pb2.LoadRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with token_channel(worker.address, TOKEN) as channel:
        assert stub_cls(channel).GetLoad(worker_pb2.LoadRequest(), timeout=10).num_total_blocks > 0
    with grpc.insecure_channel(worker.address) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_kv_cannot_be_pushed_without_the_token(cluster):
    _, _, _, decode = cluster
    with token_channel(decode.address, None) as channel, pytest.raises(grpc.RpcError) as info:
        kvtransfer_pb2_grpc.KVTransferStub(channel).Push(
            iter([kvtransfer_pb2.KVChunk(transfer_id="x", last=True)]), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
