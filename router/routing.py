"""Routing policy: which decode worker, and which prefill worker (if any), serve a request.

Pure: plain Python over WorkerInfo values and counts; no I/O, torch, grpc or redis.

Load of a worker = running + waiting as it last reported to the registry (up to a heartbeat old)
+ the requests this router has sent it that are still open (its own in-flight count, which is
current). The least-loaded ready worker wins; ties go to the lower KV usage, then to the smaller
worker_id, so the same inputs always give the same choice. With no ready prefill worker the
request is "colocated": the decode worker prefills it itself.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.registry import WorkerInfo


class PrefillMode(enum.Enum):
    REMOTE = "remote"  # a prefill worker computes the KV and pushes it to the decode worker
    LOCAL = "local"  # colocated: the decode worker prefills


@dataclass(frozen=True)
class RoutePlan:
    decode: WorkerInfo
    prefill: WorkerInfo | None

    @property
    def mode(self) -> PrefillMode:
        return PrefillMode.LOCAL if self.prefill is None else PrefillMode.REMOTE


class NoWorkerError(RuntimeError):
    """No ready worker of a needed role."""

    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} worker is ready; the cluster may still be starting")
        self.role = role


def worker_load(worker: WorkerInfo, inflight: Mapping[str, int]) -> int:
    return worker.num_running + worker.num_waiting + inflight.get(worker.worker_id, 0)


def choose_least_loaded(workers: Sequence[WorkerInfo], role: str, inflight: Mapping[str, int],
                        exclude: frozenset[str] = frozenset()) -> WorkerInfo | None:
    """The least-loaded ready worker of `role`, or None."""
    candidates = [w for w in workers
                  if w.role == role and w.state == "ready" and w.worker_id not in exclude]
    if not candidates:
        return None
    return min(candidates, key=lambda w: (worker_load(w, inflight), w.kv_usage, w.worker_id))


def plan_route(workers: Sequence[WorkerInfo], inflight: Mapping[str, int],
               exclude: frozenset[str] = frozenset(), allow_remote: bool = True) -> RoutePlan:
    """Choose D (required) and P (when a ready prefill worker exists and allow_remote).

    Raises NoWorkerError("decode") when no decode worker is ready.
    """
    decode = choose_least_loaded(workers, "decode", inflight, exclude)
    if decode is None:
        raise NoWorkerError("decode")
    prefill = choose_least_loaded(workers, "prefill", inflight, exclude) if allow_remote else None
    return RoutePlan(decode=decode, prefill=prefill)
