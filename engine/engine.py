"""LLMEngine: the model runtime behind both worker roles. Single-threaded; callers serialize access.

Local request:   add_request -> step()* (first token after the prefill, then one per decode step)
Prefill role:    add_request(prefill_only=True) -> step()* reports the first token, the request
                 keeps its blocks -> read_kv(...)* -> release(); or, to send the K/V while it is
                 computed, stream_kv() right after add_request (engine/kv_stream.py)
Decode role:     reserve (returns the prompt tokens already cached here) -> write_kv(...)* for the
                 rest -> commit(first_token) -> step()* reports tokens 1..
abort() works in every state and frees the request's blocks.

With enable_prefix_caching, both roles reuse the K/V of full blocks cached from earlier requests
(engine/radix_cache.py). With enable_kv_events too, the cache records what it stores and evicts
for a consumer that drains it with take_kv_events().

Start-up values (number of KV blocks, EOS ids, max_model_len) live here, never in EngineConfig.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from engine.block_pool import BlockPool
from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import KVCache, kv_bytes_per_token
from engine.kv_stream import KVStream
from engine.models.layers import rope_inv_freq
from engine.models.llama import LlamaModel, ModelArgs
from engine.radix_cache import KVEvent, KVEventBatch, RadixCache
from engine.request import InvalidRequestError, RequestOutput, SamplingParams, check_prompt
from engine.runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.stats import EngineStats, StepTiming
from engine.weights import load_state_dict

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 matmuls are ~100x slower than fp32 on AVX2 CPUs (measured); GPUs want bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def read_eos_token_ids(model_dir: Path) -> frozenset[int]:
    """EOS ids from generation_config.json, else config.json (an int or a list)."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()


def build_model(
    model_config: ModelConfig, model_dir: Path, device: torch.device, dtype: torch.dtype
) -> LlamaModel:
    args = ModelArgs.from_model_config(model_config)
    with torch.device("meta"):
        model = LlamaModel(args)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
    model.load_hf_state_dict(load_state_dict(model_dir))
    return model.eval()


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        model_dir = Path(config.model)
        self.model_config = ModelConfig.from_dir(model_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        max_positions = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > max_positions:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {max_positions}"
            )
        self.max_model_len = config.max_model_len or max_positions
        self.eos_token_ids = read_eos_token_ids(model_dir)
        self.block_size = config.block_size
        self.kv_dtype = self.dtype
        mc = self.model_config
        self.kv_bytes_per_token = kv_bytes_per_token(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, self.kv_dtype
        )
        num_blocks = config.kv_cache_memory_bytes // (self.block_size * self.kv_bytes_per_token)
        if num_blocks == 0:
            raise ValueError(
                f"kv_cache_memory_bytes={config.kv_cache_memory_bytes} holds no block; one block "
                f"of {self.block_size} tokens needs {self.block_size * self.kv_bytes_per_token}"
            )

        model = build_model(mc, model_dir, self.device, self.dtype)
        self.kv_cache = KVCache(
            num_layers=mc.num_layers, num_blocks=num_blocks, block_size=self.block_size,
            num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, dtype=self.kv_dtype,
            device=self.device,
        )
        self.prefix_cache = (
            RadixCache(self.block_size, enable_events=config.enable_kv_events)
            if config.enable_prefix_caching else None
        )
        self.block_pool = BlockPool(num_blocks, prefix_cache=self.prefix_cache)
        self.scheduler = Scheduler(
            self.block_pool,
            block_size=self.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
        )
        self.runner = ModelRunner(model, self.kv_cache, self.device)
        self.last_step: StepTiming | None = None
        logger.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d tokens, max_model_len %d",
            model_dir, self.device, self.dtype, num_blocks, self.block_size, self.max_model_len,
        )

    # ------------------------------------------------------------------ properties
    @property
    def stats(self) -> EngineStats:
        return self.scheduler.stats

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_total_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def kv_usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.reserved)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        prefill_only: bool = False,
        output_token_ids: Iterable[int] = (),
    ) -> None:
        """output_token_ids: tokens generated for this request elsewhere (a decode worker that
        failed); they are computed after the prompt and count as its outputs, so the request
        resumes where it stopped (for greedy or seeded sampling, with the same tokens)."""
        seq = self._new_sequence(request_id, prompt_token_ids, sampling, prefill_only,
                                 output_token_ids)
        self.scheduler.add(seq)
        logger.debug("request %s: added, %d prompt tokens", request_id, seq.num_prompt_tokens)

    def step(self) -> list[RequestOutput]:
        """One forward pass over what the scheduler picks; sets last_step (None if nothing ran)."""
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            self.last_step = None
            return self.scheduler.take_pending()
        # A decode advances a sequence that has outputs by its one newest token; anything else
        # (a prompt chunk, even of one token after a cache hit, or a recompute) is prefill work.
        is_prefill = not all(
            item.num_new_tokens == 1 and item.seq.num_output_tokens > 0 and item.samples
            for item in scheduled
        )
        streams = [(item.seq.kv_stream, item.seq.num_computed_tokens + item.num_new_tokens)
                   for item in scheduled if item.seq.kv_stream is not None]
        on_layer = None
        if streams:
            def on_layer(layer: int) -> None:  # this layer's K/V of the pass is in the pool
                for stream, num_tokens in streams:
                    stream.publish(layer, num_tokens)
        sampled, logprobs = self.runner.execute(scheduled, on_layer=on_layer)
        outputs = self.scheduler.update(scheduled, sampled, logprobs)
        self.last_step = StepTiming(
            is_prefill=is_prefill,
            num_tokens=sum(item.num_new_tokens for item in scheduled),
            seconds=time.perf_counter() - start,
        )
        return outputs

    def has_unfinished(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.running or s.has_pending())

    def abort(self, request_id: str) -> bool:
        """Free request_id's blocks in any state. A finished prefill-only request (its KV read out)
        is simply released, which is not logged as an abort."""
        finished = request_id in self.scheduler.held
        aborted = self.scheduler.abort(request_id)
        if aborted and not finished:
            logger.info("request %s: aborted", request_id)
        return aborted

    # ------------------------------------------------------------------ prefix cache
    def take_kv_events(self) -> list[KVEvent]:
        """The prefix cache's BlockStored / BlockRemoved / AllBlocksCleared events since the last
        call, oldest first: the consumer's call (a router's index of cached blocks), to make
        regularly. [] unless enable_prefix_caching and enable_kv_events."""
        return self.prefix_cache.take_events() if self.prefix_cache is not None else []

    def kv_event_batch(self, snapshot: bool = False) -> KVEventBatch:
        """take_kv_events, with the drop count and, if `snapshot`, the hash of every block cached
        after them: what a consumer that resynchronizes needs, in one consistent cut."""
        if self.prefix_cache is None:
            return KVEventBatch([], 0, [] if snapshot else None, self.block_size)
        return self.prefix_cache.take_event_batch(snapshot)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block; refused (False) while any block is in use."""
        if self.prefix_cache is None:
            return True
        if self.block_pool.num_used_blocks:
            return False
        self.prefix_cache.clear()
        return True

    # ------------------------------------------------------------------ prefill role
    def read_kv(
        self, request_id: str, layer_start: int, layer_end: int, token_start: int, token_end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.scheduler.requests.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id} is unknown")
        self._check_ranges(layer_start, layer_end, token_start, token_end, seq.num_computed_tokens)
        slots = self.kv_cache.slots(seq.block_table, token_start, token_end)
        return self.kv_cache.read(layer_start, layer_end, slots)

    def release(self, request_id: str) -> None:
        self.scheduler.release(request_id)

    def stream_kv(self, request_id: str) -> KVStream:
        """A stream of the prefill-only request's K/V as each layer of each pass computes it,
        for a reader on another thread; call it before the request's first step."""
        seq = self.scheduler.requests.get(request_id)
        if seq is None or not seq.prefill_only:
            raise ValueError(f"request {request_id} is not a prefill_only request")
        if seq.num_computed_tokens or seq.kv_stream is not None:
            raise ValueError(f"request {request_id} has started already")
        seq.kv_stream = KVStream(self.kv_cache, seq)
        return seq.kv_stream

    # ------------------------------------------------------------------ decode role
    def reserve(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> int:
        """Reserve blocks for the prompt; returns how many of its leading tokens are cached here
        (their blocks are shared: write_kv refuses them)."""
        seq = self._new_sequence(request_id, prompt_token_ids, sampling, prefill_only=False)
        return self.scheduler.reserve(seq)

    def write_kv(
        self,
        request_id: str,
        layer_start: int,
        layer_end: int,
        token_start: int,
        token_end: int,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        seq = self.scheduler.reserved.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id} is not waiting for KV")
        self._check_ranges(layer_start, layer_end, token_start, token_end, seq.num_prompt_tokens)
        if token_start < seq.num_computed_tokens:
            raise ValueError(
                f"token range [{token_start}, {token_end}) starts below the "
                f"{seq.num_computed_tokens} prompt tokens cached here for request {request_id} "
                "(their blocks are shared)"
            )
        mc = self.model_config
        shape = (layer_end - layer_start, token_end - token_start, mc.num_kv_heads, mc.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            if not t.is_floating_point():
                raise ValueError(f"{name} has dtype {t.dtype}; a float dtype is required")
        slots = self.kv_cache.slots(seq.block_table, token_start, token_end)
        self.kv_cache.write(layer_start, layer_end, slots, k, v)

    def commit(self, request_id: str, first_token_id: int) -> None:
        if not 0 <= first_token_id < self.model_config.vocab_size:
            raise ValueError(
                f"first_token_id {first_token_id} is outside the vocabulary "
                f"[0, {self.model_config.vocab_size})"
            )
        self.scheduler.commit(request_id, first_token_id)

    # ------------------------------------------------------------------ helpers
    def _new_sequence(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        prefill_only: bool,
        output_token_ids: Iterable[int] = (),
    ) -> Sequence:
        prompt, outputs = list(prompt_token_ids), list(output_token_ids)
        check_prompt(len(prompt), sampling.max_tokens, self.max_model_len)
        vocab = self.model_config.vocab_size
        for name, ids in (("prompt", prompt), ("output_token_ids", outputs)):
            if ids and (min(ids) < 0 or max(ids) >= vocab):
                raise InvalidRequestError(f"{name} token ids must be in [0, {vocab})", name)
        if outputs and (prefill_only or len(outputs) >= sampling.max_tokens
                        or len(prompt) + len(outputs) >= self.max_model_len):
            raise InvalidRequestError(
                f"{len(outputs)} output tokens leave nothing to generate (max_tokens "
                f"{sampling.max_tokens}, context {self.max_model_len}), or the request is "
                "prefill-only", "output_token_ids")
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        return Sequence(
            request_id=request_id,
            token_ids=prompt + outputs,
            num_prompt_tokens=len(prompt),
            sampling=sampling,
            seed=seed,
            prefill_only=prefill_only,
        )

    def _check_ranges(
        self, layer_start: int, layer_end: int, token_start: int, token_end: int, num_tokens: int
    ) -> None:
        num_layers = self.model_config.num_layers
        if not 0 <= layer_start < layer_end <= num_layers:
            raise ValueError(
                f"layer range [{layer_start}, {layer_end}) is not within [0, {num_layers})"
            )
        if not 0 <= token_start < token_end <= num_tokens:
            raise ValueError(
                f"token range [{token_start}, {token_end}) is not within [0, {num_tokens})"
            )
