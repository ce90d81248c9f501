"""Counters the engine keeps about itself, read by the worker shells for their metrics. Torch-free.

EngineStats is cumulative since the engine started; the worker shell exports it as Prometheus
counters at scrape time. StepTiming describes one step; the loop that calls `step()` observes it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed, not received)
    num_preemptions: int = 0  # sequences preempted (blocks freed, to be recomputed)


@dataclass(frozen=True)
class StepTiming:
    """One engine step: a decode step only advances sequences that already have outputs by their
    newest token; any other step (it computes prompt tokens, or recomputes after a preemption)
    is a prefill step."""

    is_prefill: bool
    num_tokens: int  # tokens computed in the forward pass
    seconds: float  # wall time of the forward pass, sampling and bookkeeping
