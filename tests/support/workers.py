"""Real prefill and decode workers on loopback, in this process, for integration tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from decode_worker.server import DecodeWorker
from engine.config import EngineConfig
from prefill_worker.server import PrefillWorker


def engine_config(model_dir: Path, **overrides) -> EngineConfig:
    settings = {"model": str(model_dir), "device": "cpu", "dtype": "float32",
                "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 32, "max_num_batched_tokens": 512}
    settings.update(overrides)
    return EngineConfig(**settings)


@contextlib.contextmanager
def running_workers(
    model_dir: Path, *, num_prefill: int = 1, num_decode: int = 1, kv_lease_s: float = 30.0,
    kv_compression: str = "none", kv_shared_memory: bool = True, cluster_token: str | None = None,
    tls=None, **engine_overrides,
) -> Iterator[tuple[list[PrefillWorker], list[DecodeWorker]]]:
    config = engine_config(model_dir, **engine_overrides)
    prefill = [PrefillWorker(config, worker_id=f"prefill-{i}", model_name="tiny",
                             kv_compression=kv_compression, kv_shared_memory=kv_shared_memory,
                             cluster_token=cluster_token, tls=tls)
               for i in range(num_prefill)]
    decode = [DecodeWorker(config, worker_id=f"decode-{i}", model_name="tiny",
                           kv_lease_s=kv_lease_s, cluster_token=cluster_token, tls=tls)
              for i in range(num_decode)]
    started = []
    try:
        for w in (*prefill, *decode):
            w.start()
            started.append(w)
        yield prefill, decode
    finally:
        for w in started:
            w.stop(grace=1.0)


@contextlib.contextmanager
def running_cluster(model_dir: Path, *, num_prefill: int = 1, num_decode: int = 1,
                    kv_compression: str = "none", cluster_token: str | None = None,
                    tls=None, disaggregation: str = "always", **engine_overrides):
    """Workers plus a router that finds them through a static directory (no Redis, no Ray).
    Every prompt goes through a prefill worker when there is one (disaggregation "always"), so
    tests of that path see it whatever their prompts' lengths; "auto" is the deployed default."""
    import os

    from router.config import RouterConfig
    from router.registry import StaticWorkerDirectory, WorkerInfo
    from router.routing import RoutingPolicy
    from router.server import Router

    with running_workers(model_dir, num_prefill=num_prefill, num_decode=num_decode,
                         kv_compression=kv_compression, cluster_token=cluster_token, tls=tls,
                         **engine_overrides) as (prefill, decode):
        infos = [WorkerInfo(worker_id=w.worker_id, role=w.role, state="ready",
                            grpc_address=w.address, metrics_url="", pid=os.getpid(),
                            node="local") for w in (*prefill, *decode)]
        config = RouterConfig(model_name="tiny", model_dir=str(model_dir), http_port=0,
                              grpc_port=0, cluster_token=cluster_token, cluster_tls=tls,
                              routing=RoutingPolicy(disaggregation=disaggregation))
        with Router(config, StaticWorkerDirectory(infos)) as router:
            yield router, prefill, decode
