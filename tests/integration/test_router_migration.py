"""A decode worker killed (SIGKILL) in the middle of a stream, with real worker processes and a
router in this process: the request moves to the other decode worker, which resumes after the
tokens already streamed, and the client's stream completes with the text of a fault-free run."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from baton.v1 import generation_pb2, generation_pb2_grpc
from tests.support.models import hf_generate_greedy, tiny_model
from tests.support.processes import WorkerProcesses

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NUM_TOKENS = 200
KILL_AFTER = 20


@contextlib.contextmanager
def router_over(model_dir, workers):
    from router.config import RouterConfig
    from router.registry import StaticWorkerDirectory
    from router.server import Router

    config = RouterConfig(model_name="tiny", model_dir=str(model_dir), http_port=0, grpc_port=0)
    with Router(config, StaticWorkerDirectory([w.info() for w in workers])) as router:
        yield router


def test_decode_worker_killed_mid_stream_the_request_migrates_and_completes(tmp_path):
    model_dir = tiny_model("llama-gqa")
    prompt = [(11 * j) % 300 + 3 for j in range(40)]
    expected = hf_generate_greedy(model_dir, prompt, NUM_TOKENS)
    with WorkerProcesses(model_dir, tmp_path) as procs:
        # With equal loads the router picks the smaller worker id: decode-0 serves first.
        prefill, victim, survivor = procs.ensure(
            ("prefill", "prefill-0", {}), ("decode", "decode-0", {}), ("decode", "decode-1", {}))
        with router_over(model_dir, [prefill, victim, survivor]) as router, \
                grpc.insecure_channel(router.grpc_address) as channel:
            request = generation_pb2.GenerateRequest(
                token_ids=generation_pb2.TokenIds(ids=prompt), temperature=0.0,
                max_tokens=NUM_TOKENS, ignore_eos=True)
            tokens: list[int] = []
            for msg in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120):
                tokens += msg.token_ids
                if len(tokens) >= KILL_AFTER and victim.proc.returncode is None:
                    victim.kill()
            migrations = router.metrics.request_migrations._value.get()
        assert victim.proc.returncode == -9
        assert survivor.proc.poll() is None
    assert tokens == expected  # none lost, none repeated, the same greedy continuation
    assert migrations == 1
