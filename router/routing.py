"""Routing policy: which decode worker, and which prefill worker (if any), serve a request.

Pure: plain Python over WorkerInfo values and counts; no I/O, torch, grpc or redis.

Every option is priced in one unit, tokens of prefill work, with the weights of RoutingPolicy:

    load(W)      = running + waiting (as W last reported, up to a heartbeat old)
                   + this router's open requests on W (current)
    base(D)      = request_tokens × load(D) + kv_usage_tokens × kv_usage(D)
    local(D)     = base(D) + local_prefill_factor × (n − cached(D))
    remote(D, P) = base(D) + (n − cached(P)) + request_tokens × load(P)
                   + transfer_tokens × (n − cached(D))

n is the prompt's length and cached(W) the prefix of it the global prefix index says W holds
(0 without an index). A remote prefill computes what P lacks and moves what D lacks (the decode
worker reports its own cached prefix before the push; those blocks never move): the bytes to move
are a cost, weighed by transfer_tokens per token. A local prefill costs more per token than a
remote one (local_prefill_factor > 1) because it stalls the decode worker's running batch.

Conditional disaggregation: a decode worker prefills itself when the part of the prompt it lacks
is at most local_prefill_max_tokens ("short"), when no prefill worker is ready or a remote one is
not allowed ("no_prefill" / "resume"), or when local(D) is cheaper than the best remote(D, P), i.e.
every prefill worker is busier than the decode worker could absorb ("cost"). With disaggregation
"always", every request goes through a prefill worker when one is ready.

The decode worker is the one whose best option is cheapest ("kv_aware"), or the next one in turn
("round_robin", a prefix-blind baseline for benchmarks). Ties go to the worker whose cache holds
fewer blocks (so that prompts no worker has cached spread over the workers instead of piling onto
one), then to the smaller worker_id, so the same inputs always give the same choice.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.registry import WorkerInfo

POLICIES = ("kv_aware", "round_robin")
DISAGGREGATION = ("auto", "always")


class PrefillMode(enum.Enum):
    REMOTE = "remote"  # a prefill worker computes the KV and pushes it to the decode worker
    LOCAL = "local"  # colocated: the decode worker prefills


@dataclass(frozen=True)
class RoutingPolicy:
    """The policy's switches and weights (the module docstring gives the formulas)."""

    policy: str = "kv_aware"  # or "round_robin"
    disaggregation: str = "auto"  # or "always": remote whenever a prefill worker is ready
    local_prefill_max_tokens: int = 128  # a suffix this short is prefilled on the decode worker
    request_tokens: float = 256.0  # one request running, waiting or in flight on a worker
    kv_usage_tokens: float = 512.0  # a decode worker's KV cache at usage 1.0
    local_prefill_factor: float = 2.0  # a token prefilled on the decode worker
    transfer_tokens: float = 0.25  # a token's KV moved from the prefill to the decode worker

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.disaggregation not in DISAGGREGATION:
            raise ValueError(f"disaggregation must be one of {', '.join(DISAGGREGATION)}, "
                             f"got {self.disaggregation!r}")
        if self.local_prefill_max_tokens < 0:
            raise ValueError(
                f"local_prefill_max_tokens must be >= 0, got {self.local_prefill_max_tokens}")
        for name in ("request_tokens", "kv_usage_tokens", "local_prefill_factor",
                     "transfer_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class RoutePlan:
    decode: WorkerInfo
    prefill: WorkerInfo | None
    reason: str = "cost"  # why this mode: cost, short, no_prefill, resume, always
    cached_tokens: int = 0  # the prefix the index says the chosen decode worker holds

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


def ready_workers(workers: Sequence[WorkerInfo], role: str,
                  exclude: frozenset[str] = frozenset()) -> list[WorkerInfo]:
    """The ready workers of `role` not in exclude, by worker_id."""
    return sorted((w for w in workers
                   if w.role == role and w.state == "ready" and w.worker_id not in exclude),
                  key=lambda w: w.worker_id)


def prefill_cost(worker: WorkerInfo, num_prompt_tokens: int, inflight: Mapping[str, int],
                 cached: Mapping[str, int], policy: RoutingPolicy) -> float:
    """What prefilling the prompt on a prefill worker costs: the tokens it lacks, plus its queue."""
    uncached = num_prompt_tokens - min(cached.get(worker.worker_id, 0), num_prompt_tokens)
    return uncached + policy.request_tokens * worker_load(worker, inflight)


def choose_prefill(workers: Sequence[WorkerInfo], num_prompt_tokens: int,
                   inflight: Mapping[str, int], cached: Mapping[str, int] | None = None,
                   policy: RoutingPolicy = RoutingPolicy(),
                   exclude: frozenset[str] = frozenset()) -> WorkerInfo | None:
    """The ready prefill worker with the lowest prefill_cost, or None."""
    candidates = ready_workers(workers, "prefill", exclude)
    if not candidates:
        return None
    cached = cached or {}
    return min(candidates,
               key=lambda p: (prefill_cost(p, num_prompt_tokens, inflight, cached, policy),
                              p.worker_id))


def plan_route(workers: Sequence[WorkerInfo], inflight: Mapping[str, int], *,
               num_prompt_tokens: int, cached: Mapping[str, int] | None = None,
               cache_blocks: Mapping[str, int] | None = None,
               policy: RoutingPolicy = RoutingPolicy(), exclude: frozenset[str] = frozenset(),
               allow_remote: bool = True, turn: int = 0) -> RoutePlan:
    """Choose D (required) and P (None: D prefills). cached: prefix tokens per worker from the
    prefix index (None or {}: none known, i.e. load-only routing); cache_blocks: the blocks each
    worker's cache holds (the tie-breaker). turn: the request's number, for round_robin.

    Raises NoWorkerError("decode") when no decode worker is ready.
    """
    decoders = ready_workers(workers, "decode", exclude)
    if not decoders:
        raise NoWorkerError("decode")
    cached = cached or {}
    n = num_prompt_tokens
    prefill = (choose_prefill(workers, n, inflight, cached, policy, exclude)
               if allow_remote else None)

    def option(d: WorkerInfo) -> tuple[float, RoutePlan]:
        have = min(cached.get(d.worker_id, 0), n)
        base = (policy.request_tokens * worker_load(d, inflight)
                + policy.kv_usage_tokens * d.kv_usage)
        local = base + policy.local_prefill_factor * (n - have)
        if prefill is None:
            return local, RoutePlan(d, None, "no_prefill" if allow_remote else "resume", have)
        remote = (base + prefill_cost(prefill, n, inflight, cached, policy)
                  + policy.transfer_tokens * (n - have))
        if policy.disaggregation == "always":
            return remote, RoutePlan(d, prefill, "always", have)
        if n - have <= policy.local_prefill_max_tokens:
            return local, RoutePlan(d, None, "short", have)
        if local < remote:
            return local, RoutePlan(d, None, "cost", have)
        return remote, RoutePlan(d, prefill, "cost", have)

    if policy.policy == "round_robin":
        return option(decoders[turn % len(decoders)])[1]
    sizes = cache_blocks or {}
    return min((option(d) for d in decoders),
               key=lambda c: (c[0], sizes.get(c[1].decode.worker_id, 0),
                              c[1].decode.worker_id))[1]
