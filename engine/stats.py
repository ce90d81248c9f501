"""Counters the engine keeps about itself, read by the worker shells for their metrics. Torch-free.

Cumulative since the engine started; the worker shell turns the differences into Prometheus
counters. Step times are kept for the last step only: the loop that calls `step()` observes them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed, not received)
    num_preemptions: int = 0  # sequences preempted (blocks freed, to be recomputed)
