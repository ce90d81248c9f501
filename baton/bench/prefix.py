"""The prefix-cache part of the engine benchmark: time to first token, cached prefix vs cold.

The prompt is num_prefix_tokens shared tokens + num_suffix_tokens new ones. A warm-up request puts
the prefix into each engine's own prefix cache; then, interleaved num_repeats times, a prompt with
that prefix and a new suffix ("cached") runs against one with a never-seen prefix ("cold").

Prefill role (also the colocated path): add_request(prefill_only=True) -> step()* -> first token.
    The cached tokens are the growth of EngineStats.prefix_cache_hits during the request.
Decode role: reserve() -> write_kv() for exactly the tokens reserve() did not report cached, all
    layers, K/V read beforehand from the prefill-role engine with read_kv() as a decode worker
    receives them -> commit(first token) -> step()* -> the first decode token.

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
    """(seconds from reserve() to the first decode token, cached tokens reserve() reported)."""
    request_id = new_request_id("decode-role")
    num_tokens = len(prompt)
    start = time.perf_counter()
    num_cached = engine.reserve(request_id, prompt, greedy_params(2))
    if num_cached < num_tokens:
        engine.write_kv(request_id, 0, engine.model_config.num_layers, num_cached, num_tokens,
                        source.k[:, num_cached:], source.v[:, num_cached:])
    engine.commit(request_id, source.first_token_id)
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id and out.new_token_ids:
                seconds = time.perf_counter() - start
                engine.abort(request_id)  # no-op once it finished at max_tokens=2
                return seconds, num_cached
    raise RuntimeError(f"request {request_id}: no decode token after commit")


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
