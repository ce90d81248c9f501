"""What int8 KV on the wire costs in output quality: greedy decoding after an int8 transfer
against decoding after an uncompressed one, on the same prompts and the same engines.

In one process, two engines, float32 on CPU, prefix caching off (so no transfer reuses another's
K/V). For each prompt the prefill-role engine computes the K/V and samples the first token
(add_request(prefill_only=True) -> read_kv -> release). The K/V then cross the wire format twice,
as the workers exchange them (iter_chunks with compression "none", then "int8", each chunk
decoded and validated by decode_chunk), into the decode-role engine (reserve -> write_kv ->
commit(first token)) as two requests, which it decodes together, a batch of two, for num_tokens
greedy tokens. Both start from the same first token, so only the transferred K/V differ.

Prompts (from the seed): even indices are chat prompts (an instruction about a subject, through
the model's chat template), odd ones random token ids of 16 to 256 tokens.

Reported, overall and per prompt kind:
- prompts whose num_tokens decoded tokens are identical (count and share);
- the mean share of tokens before the first divergence;
- the largest absolute logit difference, teacher-forced on the uncompressed tokens: over every
  decode step whose input tokens are still the same in both runs (all num_tokens steps of an
  identical prompt, up to and including the first divergent step otherwise), and over the first
  decode step alone; with the largest absolute logit, for scale;
- KV bytes on the wire (payload and scales) of int8 over the raw KV dtype.

Run: .venv/bin/python -m baton.bench.kv_quality [--num-prompts 50 --num-tokens 64 --seed 0]
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from baton.bench.engine import greedy_params, new_request_id, random_prompt
from baton.bench.prefix import PrefillRun, prefill_role
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.tokenizer import Tokenizer
from engine.weights import resolve_model
from kvtransfer.codec import DTYPE_NAMES, KVGeometry, chunk_num_bytes, decode_chunk
from kvtransfer.compression import DEFAULT_SCALE_BLOCK_TOKENS
from kvtransfer.sender import iter_chunks

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
MIN_RANDOM_TOKENS, MAX_RANDOM_TOKENS = 16, 256
INSTRUCTIONS = (
    "Explain {} to a ten-year-old.",
    "Write a short poem about {}.",
    "List three surprising facts about {}.",
    "What is the history of {}? Answer in a paragraph.",
    "Describe {} in two sentences.",
    "Write a short story in which {} plays a part.",
)
SUBJECTS = (
    "the moon", "volcanoes", "honey bees", "the printing press", "relay races", "photosynthesis",
    "the Roman empire", "glaciers", "jazz music", "prime numbers", "lighthouses", "the internet",
    "coral reefs", "chess", "the steam engine", "rainbows", "owls", "bread baking",
)


def make_prompts(tokenizer: Tokenizer, vocab_size: int, num_prompts: int,
                 seed: int) -> list[tuple[str, list[int]]]:
    """(kind, token ids): chat prompts at even indices, random token ids at odd ones."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num_prompts):
        if i % 2 == 0:
            text = rng.choice(INSTRUCTIONS).format(rng.choice(SUBJECTS))
            prompts.append(("chat", tokenizer.encode_chat([{"role": "user", "content": text}])))
        else:
            num_tokens = rng.randint(MIN_RANDOM_TOKENS, MAX_RANDOM_TOKENS)
            prompts.append(("random", random_prompt(rng, vocab_size, num_tokens)))
    return prompts


def transfer(engine: LLMEngine, request_id: str, prompt: list[int], source: PrefillRun,
             compression: str, max_tokens: int) -> int:
    """Move source's K/V into engine through the wire format and commit the first token, as a
    decode worker does; returns the KV bytes on the wire (payload and scales)."""
    mc = engine.model_config
    geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, engine.kv_dtype)
    num_cached = engine.reserve(request_id, prompt, greedy_params(max_tokens))
    if num_cached:
        raise RuntimeError(f"request_id={request_id}: {num_cached} tokens cached; prefix caching "
                           "must be off so that each run gets its own transfer")
    num_bytes = 0
    for chunk in iter_chunks(
        transfer_id=request_id, attempt=0, geometry=geometry, token_start=0,
        token_end=len(prompt), first_token_id=source.first_token_id, compression=compression,
        read_kv=lambda l0, l1, t0, t1: (source.k[l0:l1, t0:t1], source.v[l0:l1, t0:t1]),
    ):
        num_bytes += chunk_num_bytes(chunk)
        if chunk.token_end > chunk.token_start:  # not the last chunk, which only names the token
            k, v = decode_chunk(chunk, geometry, 0, len(prompt))
            engine.write_kv(request_id, chunk.layer_start, chunk.layer_end, chunk.token_start,
                            chunk.token_end, k, v)
    engine.commit(request_id, source.first_token_id)
    return num_bytes


def decode_pair(
    engine: LLMEngine, prompt: list[int], source: PrefillRun, compressions: tuple[str, str],
    num_tokens: int, logits: list[torch.Tensor],
) -> tuple[list[list[int]], torch.Tensor, list[int]]:
    """Two transfers of source's K/V (one per compression), then num_tokens greedy tokens for
    both, decoded in one batch: while their input tokens agree, the two logit rows of a step
    differ only through the K/V, and |row 0 - row 1| needs no row-to-request mapping.
    logits collects the engine's logits, one [2, vocab] tensor per step.
    Returns (tokens per run, |logit difference| [num_tokens, vocab], KV bytes per run)."""
    request_ids = [new_request_id(f"kv-quality-{c}") for c in compressions]
    num_bytes = [transfer(engine, rid, prompt, source, c, num_tokens + 1)
                 for rid, c in zip(request_ids, compressions)]
    logits.clear()
    tokens: dict[str, list[int]] = {rid: [] for rid in request_ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    if any(len(t) != num_tokens for t in tokens.values()) or len(logits) != num_tokens or any(
            step.shape[0] != 2 for step in logits):
        raise RuntimeError(f"request_ids={request_ids}: expected {num_tokens} steps of both "
                           f"requests, got {[len(t) for t in tokens.values()]} tokens and "
                           f"{[step.shape[0] for step in logits]} logit rows")
    steps = torch.stack(logits)  # [num_tokens, 2, vocab]
    return [tokens[rid] for rid in request_ids], (steps[:, 0] - steps[:, 1]).abs(), num_bytes


def _summary(rows: list[dict]) -> dict:
    num_identical = sum(r["identical"] for r in rows)
    return {
        "num_prompts": len(rows),
        "num_identical": num_identical,
        "share_identical": num_identical / len(rows),
        "mean_share_before_divergence": sum(r["share_before_divergence"] for r in rows) / len(rows),
        "max_abs_logit_diff_teacher_forced": max(r["logit_diff_forced"] for r in rows),
        "max_abs_logit_diff_first_step": max(r["logit_diff_first"] for r in rows),
        "max_abs_logit": max(r["max_abs_logit"] for r in rows),
    }


def measure_int8_quality(
    model_dir: str | Path, *, num_prompts: int = 50, num_tokens: int = 64, seed: int = 0,
    num_threads: int | None = None,
) -> dict:
    """Greedy agreement and logit differences of int8 against uncompressed KV transfer."""
    if num_prompts < 1 or num_tokens < 1:
        raise ValueError(f"num_prompts and num_tokens must be >= 1, got {num_prompts} and "
                         f"{num_tokens}")
    start = time.perf_counter()
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32",
                          kv_cache_memory_bytes=64 << 20, max_num_seqs=4,
                          enable_prefix_caching=False, num_threads=num_threads)
    prefill_engine, decode_engine = LLMEngine(config), LLMEngine(config)
    prompts = make_prompts(Tokenizer.from_dir(model_dir), prefill_engine.model_config.vocab_size,
                           num_prompts, seed)
    logits: list[torch.Tensor] = []  # the decode engine's logits of one step: [2, vocab]
    hook = decode_engine.runner.model.lm_head.register_forward_hook(
        lambda module, inputs, output: logits.append(output.detach().float().clone()))
    rows: list[dict] = []
    num_bytes = {"none": 0, "int8": 0}
    try:
        for i, (kind, prompt) in enumerate(prompts):
            source = prefill_role(prefill_engine, prompt)
            (plain, int8), diff, sent = decode_pair(decode_engine, prompt, source,
                                                    ("none", "int8"), num_tokens, logits)
            num_bytes["none"] += sent[0]
            num_bytes["int8"] += sent[1]
            diverge = next((j for j, (a, b) in enumerate(zip(plain, int8)) if a != b), num_tokens)
            same_inputs = min(diverge + 1, num_tokens)  # steps fed the same tokens in both runs
            rows.append({
                "kind": kind,
                "identical": diverge == num_tokens,
                "share_before_divergence": diverge / num_tokens,
                "logit_diff_forced": diff[:same_inputs].max().item(),
                "logit_diff_first": diff[0].max().item(),
                "max_abs_logit": max(step.abs().max().item() for step in logits),
                "num_prompt_tokens": len(prompt),
            })
            if (i + 1) % 10 == 0 or i + 1 == num_prompts:
                logger.info("kv quality: %d/%d prompts, %d identical, %.0f s", i + 1, num_prompts,
                            sum(r["identical"] for r in rows), time.perf_counter() - start)
    finally:
        hook.remove()
    lengths = [r["num_prompt_tokens"] for r in rows]
    return {
        "model": Path(model_dir).name,
        "kv_dtype": DTYPE_NAMES[decode_engine.kv_dtype],
        "compression": "int8",
        "scale_block_tokens": DEFAULT_SCALE_BLOCK_TOKENS,
        "num_tokens": num_tokens,
        "seed": seed,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths),
                          "mean": sum(lengths) / len(lengths)},
        **_summary(rows),
        "by_kind": {kind: _summary([r for r in rows if r["kind"] == kind])
                    for kind in sorted({r["kind"] for r in rows})},
        "kv_bytes_none": num_bytes["none"],
        "kv_bytes_int8": num_bytes["int8"],
        "bytes_ratio": num_bytes["int8"] / num_bytes["none"],
        "logit_diff": "teacher-forced on the uncompressed tokens: the steps whose inputs are the "
                      "same in both runs (all of an identical prompt; up to the first divergent "
                      "one included otherwise); first_step: the first decode step",
        "seconds": time.perf_counter() - start,
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model name, .gguf or HF dir")
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--num-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = measure_int8_quality(resolve_model(args.model), num_prompts=args.num_prompts,
                                  num_tokens=args.num_tokens, seed=args.seed,
                                  num_threads=args.num_threads)
    print(json.dumps(result, indent=2))
