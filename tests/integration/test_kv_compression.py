"""kvtransfer.compression int8 through the whole path: client -> router -> prefill worker -> int8
KV over gRPC -> decode worker. The request completes, and the KV bytes both workers count (payload
and scales) are at most 0.3 of what the same request sends uncompressed in float32. The cluster
config's kvtransfer.compression reaches the prefill worker through its actor."""

from __future__ import annotations

import pytest

import baton
from cluster.actors import PrefillWorkerActor
from cluster.config import load_config
from cluster.launcher import Cluster
from prefill_worker.server import PrefillWorker
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.workers import running_cluster

pytestmark = pytest.mark.integration

MAX_TOKENS = 12


def kv_bytes(worker) -> float:
    labels = {"model": "tiny", "role": worker.role, "worker": worker.worker_id}
    return worker.registry.get_sample_value("baton_kv_transfer_bytes_total", labels) or 0.0


def run(model_dir, prompt: list[int], compression: str) -> tuple[tuple[int, ...], float, float]:
    """(tokens, KV bytes the prefill worker sent, KV bytes the decode worker received)."""
    with running_cluster(model_dir, kv_compression=compression) as (router, prefill, decode), \
            baton.Client(router.grpc_address, timeout=120) as client:
        result = client.generate(token_ids=prompt, temperature=0.0, max_tokens=MAX_TOKENS,
                                 ignore_eos=True)
        return result.token_ids, kv_bytes(prefill[0]), kv_bytes(decode[0])


def test_int8_request_completes_with_fewer_kv_bytes():
    model_dir = tiny_model("llama-gqa")
    prompt = [(7 * j) % 300 + 5 for j in range(150)]
    plain, plain_sent, plain_received = run(model_dir, prompt, "none")
    int8, int8_sent, int8_received = run(model_dir, prompt, "int8")

    assert plain == tuple(hf_generate_greedy(model_dir, prompt, MAX_TOKENS))  # none stays exact
    assert len(int8) == MAX_TOKENS
    assert int8[0] == plain[0]  # the first token is sampled on the prefill side: no compression
    assert plain_sent == plain_received > 0
    assert int8_sent == int8_received > 0
    assert int8_sent <= 0.3 * plain_sent


def test_the_cluster_config_reaches_the_prefill_worker():
    cfg = load_config(None, {"kvtransfer.compression": "int8"})
    launcher = Cluster(cfg, model_dir=str(tiny_model("llama-gqa")))
    launcher.redis_url = "redis://unused"  # set when the cluster starts; no server is needed here
    args = launcher._worker_actor_args(cfg.prefill, "prefill-0")
    assert args["kv_compression"] == "int8"
    actor = PrefillWorkerActor(**args)
    assert actor.make_worker().kv_compression == "int8"
    with pytest.raises(ValueError, match="compression must be one of none, int8, got 'fp8'"):
        PrefillWorker(actor.engine_config, worker_id="p", model_name="tiny", kv_compression="fp8")
