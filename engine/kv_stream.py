"""KVStream: a prefill-only request's K/V, readable layer by layer while the engine computes it.

The prefill worker sends layer l's K/V to the decode worker while the engine computes layer l + 1
(and, with chunked prefill, chunk c while it computes chunk c + 1). The engine thread publishes,
after each decoder layer of each forward pass, how many leading prompt positions of that layer are
in the pool (`publish`); a reader on another thread waits for positions (`wait`) and copies them
out of the pool (`read`) without stopping the engine.

Lifecycle: LLMEngine.stream_kv(request_id) creates the stream for a prefill-only request and the
engine publishes into it on every forward pass that computes the request; the scheduler closes it
when the request's blocks are freed (released after the push, aborted, or preempted for a
recompute). `close` waits for a read in progress and every read after it raises KVStreamClosed,
so a reader never copies a block after it went back to the pool, where another request may
already be writing it. Positions below the request's cached prefix count as computed from its
first forward pass on: their K/V was already in the pool.

On CUDA, publish runs when a layer's kernels are queued, not finished; a read is still correct
because it copies on the engine's (default) stream, behind them, and its copy to the host waits
for them; it also means the overlap there is smaller than on the CPU. A side stream or CUDA graphs
would need one event per layer for read to wait on.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from engine.kv_cache import KVCache
    from engine.sequence import Sequence


class KVStreamClosed(RuntimeError):
    """The request's blocks were freed (released, aborted or preempted): its K/V is gone."""


class KVStream:
    def __init__(self, kv_cache: KVCache, seq: Sequence) -> None:
        self.request_id = seq.request_id
        self._kv_cache = kv_cache
        self._seq = seq
        self._progress = threading.Condition()
        self._computed = [0] * kv_cache.num_layers  # per layer: leading positions in the pool
        self._pool_lock = threading.Lock()  # held by a read, and by close before blocks are freed
        self._closed_reason: str | None = None

    # -- the engine thread -------------------------------------------------------------------

    def publish(self, layer: int, num_tokens: int) -> None:
        """Positions [0, num_tokens) of `layer` are in the pool."""
        with self._progress:
            if num_tokens > self._computed[layer]:
                self._computed[layer] = num_tokens
                self._progress.notify_all()

    def close(self, reason: str) -> None:
        """Called before the request's blocks are freed; waits for a read in progress."""
        with self._pool_lock, self._progress:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._progress.notify_all()

    # -- the reader ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def wait(self, layer: int, num_tokens_seen: int, timeout: float) -> int:
        """Block until more than num_tokens_seen positions of `layer` are computed; return how
        many are. Raises KVStreamClosed, or TimeoutError after `timeout` seconds."""
        with self._progress:
            ready = self._progress.wait_for(
                lambda: self._closed_reason is not None
                or self._computed[layer] > num_tokens_seen,
                timeout,
            )
            if self._closed_reason is not None:
                raise KVStreamClosed(f"request {self.request_id}: {self._closed_reason}")
            if not ready:
                raise TimeoutError(
                    f"request {self.request_id}: layer {layer} computed no position past "
                    f"{num_tokens_seen} within {timeout:g} s"
                )
            return self._computed[layer]

    def read(
        self, layer: int, token_start: int, token_end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of positions [token_start, token_end) of one layer: [1, tokens, Hkv, D] copies."""
        with self._pool_lock:
            if self._closed_reason is not None:
                raise KVStreamClosed(f"request {self.request_id}: {self._closed_reason}")
            with self._progress:
                computed = self._computed[layer]
            if not 0 <= token_start < token_end <= computed:
                raise ValueError(
                    f"request {self.request_id}: layer {layer} positions [{token_start}, "
                    f"{token_end}) are not within the {computed} computed"
                )
            # The block table only grows while the request runs; its first entries are fixed.
            slots = self._kv_cache.slots(self._seq.block_table, token_start, token_end)
            return self._kv_cache.read(layer, layer + 1, slots)
