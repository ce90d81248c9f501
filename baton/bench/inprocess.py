"""A disaggregated cluster in this process, for benchmarks: real workers and routers on loopback.

One PrefillWorker and one DecodeWorker (each its own engine with the same EngineConfig), and two
routers over them that find their workers through a static directory (no Redis, no Ray):
`disaggregated` knows both workers, so every request is prefilled remotely on the prefill worker
and its KV pushed to the decode worker; `local` knows only the decode worker, so the router routes
colocated (PREFILL_MODE_LOCAL) and the same decode worker prefills. Both share the decode worker,
so the two modes differ only in where the prefill runs.

Lifecycle: with running_cluster(...) as cluster: workers start, then the routers; on exit the
routers stop, then the workers (in-flight RPCs get a second).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from decode_worker.server import DecodeWorker
from engine.config import EngineConfig
from prefill_worker.server import PrefillWorker
from router.config import RouterConfig
from router.registry import StaticWorkerDirectory, WorkerInfo
from router.routing import RoutingPolicy
from router.server import Router

MODEL_NAME = "bench"  # the model id the routers serve
KV_BYTES_METRIC = "baton_kv_transfer_bytes_total"


@dataclass
class InProcessCluster:
    disaggregated: Router
    local: Router
    prefill: PrefillWorker
    decode: DecodeWorker

    def kv_bytes_received(self) -> float | None:
        """KV bytes the decode worker has received so far (its Prometheus counter)."""
        labels = {"model": MODEL_NAME, "role": "decode", "worker": self.decode.worker_id}
        return self.decode.registry.get_sample_value(KV_BYTES_METRIC, labels)


def _info(worker: PrefillWorker | DecodeWorker) -> WorkerInfo:
    return WorkerInfo(worker_id=worker.worker_id, role=worker.role, state="ready",
                      grpc_address=worker.address, metrics_url="", pid=os.getpid(), node="local")


def _router(model_dir: Path, workers: list[WorkerInfo]) -> Router:
    config = RouterConfig(model_name=MODEL_NAME, model_dir=str(model_dir), http_port=0,
                          grpc_port=0, routing=RoutingPolicy(disaggregation="always"))
    return Router(config, StaticWorkerDirectory(workers))


@contextlib.contextmanager
def running_cluster(model_dir: Path, engine_config: EngineConfig) -> Iterator[InProcessCluster]:
    prefill = PrefillWorker(engine_config, worker_id="bench-prefill-0", model_name=MODEL_NAME)
    decode = DecodeWorker(engine_config, worker_id="bench-decode-0", model_name=MODEL_NAME)
    with contextlib.ExitStack() as stack:
        for worker in (prefill, decode):
            worker.start()
            stack.callback(worker.stop, 1.0)
        disaggregated = stack.enter_context(_router(model_dir, [_info(prefill), _info(decode)]))
        local = stack.enter_context(_router(model_dir, [_info(decode)]))
        yield InProcessCluster(disaggregated, local, prefill, decode)
