"""The prefix-cache part of the engine benchmark: time to first token, cached prefix vs cold.

The prompt is num_prefix_tokens shared tokens + num_suffix_tokens new ones. A warm-up request puts
the prefix into each engine's own prefix cache; then, interleaved num_repeats times, a prompt with
that prefix and a new suffix ("cached") runs against one with a never-seen prefix ("cold").

Prefill role (also the colocated path): add_request(prefill_only=True) -> step()* -> first token.
    The cached tokens are the growth of EngineStats.prefix_cache_hits during the request.
Decode role: the decode worker's part of the first token's path, from reserve() to commit(): the
    K/V of exactly the tokens reserve() did not report cached (read beforehand from the
    prefill-role engine) crosses the wire format as the workers exchange it (KVTransfer chunks
    encoded as the prefill worker sends them, decoded and validated as the receiver does) into
    write_kv(); then commit(first token). The first decode step, the same with or without a cached
    prefix (and not on the way of the first token, which the prefill worker returns), is not
    timed.

A role whose engine reports no cached token for the cached prompt is "not available", with the
reason; its cold time is still reported.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from baton.bench.engine import (
    greedy_params,
    new_request_id,
    random_prompt,
    time_to_first_token,
)
from baton.bench.engine_config import EngineBenchConfig
from engine.engine import LLMEngine
from kvtransfer.codec import KVGeometry, decode_chunk
from kvtransfer.sender import iter_chunks

logger = logging.getLogger(__name__)


@dataclass
class PrefillRun:
    seconds: float
    num_cached_tokens: int
    k: torch.Tensor  # [num_layers, num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    first_token_id: int


def prefill_role(engine: LLMEngine, prompt: list[int]) -> PrefillRun:
    """Time to first token in the prefill role; keeps the prompt's K/V for the decode role."""
    hits_before = engine.stats.prefix_cache_hits
    request_id, seconds, token_id = time_to_first_token(engine, prompt, prefill_only=True)
    num_cached = engine.stats.prefix_cache_hits - hits_before
    k, v = engine.read_kv(request_id, 0, engine.model_config.num_layers, 0, len(prompt))
    engine.release(request_id)
    return PrefillRun(seconds, num_cached, k.clone(), v.clone(), token_id)


def decode_role(engine: LLMEngine, prompt: list[int], source: PrefillRun) -> tuple[float, int]:
    """(seconds from reserve() to commit(), cached tokens reserve() reported)."""
    request_id = new_request_id("decode-role")
    mc, num_tokens = engine.model_config, len(prompt)
    geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, engine.kv_dtype)

    def read_kv(layer_start: int, layer_end: int, token_start: int, token_end: int):
        return (source.k[layer_start:layer_end, token_start:token_end],
                source.v[layer_start:layer_end, token_start:token_end])

    start = time.perf_counter()
    num_cached = engine.reserve(request_id, prompt, greedy_params(2))
    for chunk in iter_chunks(transfer_id=request_id, attempt=0, geometry=geometry,
                             token_start=num_cached, token_end=num_tokens, read_kv=read_kv,
                             first_token_id=source.first_token_id):
        if chunk.token_end > chunk.token_start:  # not the empty chunk of a fully cached prompt
            k, v = decode_chunk(chunk, geometry, num_cached, num_tokens)
            engine.write_kv(request_id, chunk.layer_start, chunk.layer_end, chunk.token_start,
                            chunk.token_end, k, v)
    engine.commit(request_id, source.first_token_id)
    seconds = time.perf_counter() - start
    engine.abort(request_id)
    return seconds, num_cached


def _summary(cached_s: float, cold_s: float, num_cached: int, reason: str | None) -> dict:
    available = reason is None
    return {
        "available": available,
        "reason": reason,
        "num_cached_tokens": num_cached,
        "cached_s": cached_s if available else None,
        "cold_s": cold_s,
        "ratio_cached_over_cold": cached_s / cold_s if available else None,
    }


def _not_cached_reason(role: str, num_prefix_tokens: int) -> str:
    return (f"the {role} engine reported no cached token for a prompt whose first "
            f"{num_prefix_tokens} tokens it had just processed")


def measure_prefix(
    prefill_engine: LLMEngine, make_decode_engine: Callable[[], LLMEngine],
    config: EngineBenchConfig,
) -> dict:
    rng = random.Random(1)
    vocab = prefill_engine.model_config.vocab_size
    num_prefix, num_suffix = config.num_prefix_tokens, config.num_suffix_tokens
    prefix = random_prompt(rng, vocab, num_prefix)
    warm = prefix + random_prompt(rng, vocab, num_suffix)
    cached = [prefix + random_prompt(rng, vocab, num_suffix) for _ in range(config.num_repeats)]
    cold = [random_prompt(rng, vocab, num_prefix + num_suffix) for _ in range(config.num_repeats)]
    if len(warm) >= prefill_engine.max_model_len:
        raise ValueError(f"the prefix-cache prompt has {len(warm)} tokens; max_model_len is "
                         f"{prefill_engine.max_model_len}")

    logger.info("prefix: prefill role, %d cached + %d new tokens vs %d cold", num_prefix,
                num_suffix, num_prefix + num_suffix)
    warm_run = prefill_role(prefill_engine, warm)
    cached_runs, cold_runs = [], []
    for repeat in range(config.num_repeats):
        logger.info("prefix: prefill role, repeat %d/%d", repeat + 1, config.num_repeats)
        cached_runs.append(prefill_role(prefill_engine, cached[repeat]))
        cold_runs.append(prefill_role(prefill_engine, cold[repeat]))
    num_cached = min(run.num_cached_tokens for run in cached_runs)
    prefill = _summary(
        min(r.seconds for r in cached_runs), min(r.seconds for r in cold_runs), num_cached,
        None if num_cached else _not_cached_reason("prefill-role", num_prefix),
    )

    logger.info("prefix: decode role, K/V of %d tokens from the prefill-role engine", len(warm))
    engine = make_decode_engine()
    decode_role(engine, warm, warm_run)
    cached_s = cold_s = float("inf")
    num_cached = num_tokens = len(warm)
    for repeat in range(config.num_repeats):
        logger.info("prefix: decode role, repeat %d/%d", repeat + 1, config.num_repeats)
        seconds, reported = decode_role(engine, cached[repeat], cached_runs[repeat])
        cached_s, num_cached = min(cached_s, seconds), min(num_cached, reported)
        cold_s = min(cold_s, decode_role(engine, cold[repeat], cold_runs[repeat])[0])
    del engine
    decode = _summary(cached_s, cold_s, num_cached,
                      None if num_cached else _not_cached_reason("decode-role", num_prefix))

    for role, row in (("prefill", prefill), ("decode", decode)):
        if row["available"]:
            logger.info("prefix: %s role, %d tokens cached: %.3f s vs %.3f s cold (%.2fx)", role,
                        row["num_cached_tokens"], row["cached_s"], row["cold_s"],
                        row["ratio_cached_over_cold"])
        else:
            logger.warning("prefix: %s role not available: %s", role, row["reason"])
    return {"num_prefix_tokens": num_prefix, "prompt_tokens": num_tokens,
            "prefill_role": prefill, "decode_role": decode}
