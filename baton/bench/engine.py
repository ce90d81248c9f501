"""The engine benchmark: Baton's LLMEngine against this machine's roofline and HF generate().

One run, one machine, float32 on CPU, greedy. In order (EngineBenchConfig.parts picks the parts):

machine  GEMM FLOP/s and read GB/s (roofline.py), measured before every part and at the end,
         the best of all: the memory floor and the GEMM roofline (the best the machine showed
         during the run, so others' work on a shared machine cannot lower it and flatter the
         ratios)
decode   one stream: Baton (add_request, step) and HF generate at batch 1 on the same chat
         prompt; decode tokens/s = (N - 1) / (time for N tokens - time for 1 token), so prefill
         is excluded; the outputs must be token-identical
batch    HF generate at batch B (the prompt B times): B (N - 1) / (t_N - t_1). Baton at C
         concurrent requests: all added, stepped until each has its first token, then N - 1
         decode steps timed: tokens produced / time
prefill  one request, max_tokens=1, a random prompt of each length: add_request -> first token
prefix   measure_prefix: a cached prefix against a cold one, prefill role and decode role

Every timing is the best of num_repeats runs, interleaved between the sides compared, so other
work on a shared machine hits both alike. The engines are the engine's own (prefix caching on
where EngineConfig has the switch), used through their public methods and EngineStats only.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from pathlib import Path

import torch

from baton.bench import engine_report, roofline
from baton.bench.engine_config import EngineBenchConfig
from engine.config import EngineConfig, ModelConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from engine.weights import resolve_model

logger = logging.getLogger(__name__)

CHAT_MESSAGE = "Write a short story about a relay race in which the baton is a small robot."
_request_numbers = itertools.count()


def new_request_id(kind: str) -> str:
    return f"bench-{kind}-{next(_request_numbers)}"


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def make_engine(model_dir: Path, config: EngineBenchConfig) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32",
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        max_num_seqs=max(64, *config.concurrency), num_threads=config.num_threads,
        enable_prefix_caching=True,
    ))


def chat_prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT_MESSAGE}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def random_prompt(rng: random.Random, vocab_size: int, num_tokens: int) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(num_tokens)]


class HFGenerate:
    """transformers generate(), float32, greedy, exactly num_tokens new tokens per row."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.eval()
        self.model.generation_config.eos_token_id = None  # never stop early

    def __call__(
        self, prompt: list[int], batch_size: int, num_tokens: int
    ) -> tuple[float, list[int]]:
        """Seconds for the whole generate() call, and row 0's new tokens."""
        input_ids = torch.tensor([prompt] * batch_size)  # [B, T]
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=num_tokens,
                min_new_tokens=0, do_sample=False, pad_token_id=0,
            )
        return time.perf_counter() - start, out[0, len(prompt):].tolist()


# ---- Baton primitives ---------------------------------------------------------------------------


def baton_generate(
    engine: LLMEngine, prompt: list[int], num_tokens: int
) -> tuple[float, list[int]]:
    """Seconds from add_request to the last of num_tokens tokens, and the tokens."""
    request_id = new_request_id("decode")
    tokens: list[int] = []
    start = time.perf_counter()
    engine.add_request(request_id, prompt, greedy_params(num_tokens))
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return time.perf_counter() - start, tokens


def baton_decode_rate(
    engine: LLMEngine, prompt: list[int], concurrency: int, num_steps: int
) -> float:
    """Aggregate tokens/s of num_steps decode steps with `concurrency` requests running.

    Each request may emit a token in every step that admits the others (chunked prefill), so
    max_tokens leaves that many over num_steps: none finishes inside the timed window, and the
    requests end on their own afterwards (untimed).
    """
    budget = engine.config.max_num_batched_tokens
    num_prefill_steps = -(-concurrency * len(prompt) // budget) + 1
    request_ids = [new_request_id(f"batch{concurrency}") for _ in range(concurrency)]
    for request_id in request_ids:
        engine.add_request(request_id, prompt, greedy_params(num_steps + num_prefill_steps))
    started: set[str] = set()
    while len(started) < concurrency:
        if not engine.has_unfinished():
            raise RuntimeError(f"{concurrency - len(started)} requests finished before a token")
        started.update(out.request_id for out in engine.step() if out.new_token_ids)
    num_tokens = 0
    start = time.perf_counter()
    for _ in range(num_steps):
        num_tokens += sum(len(out.new_token_ids) for out in engine.step())
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    if num_tokens != concurrency * num_steps:
        logger.warning("batch: %d tokens in %d steps at %d concurrent requests, expected %d",
                       num_tokens, num_steps, concurrency, concurrency * num_steps)
    return num_tokens / elapsed


def time_to_first_token(
    engine: LLMEngine, prompt: list[int], *, prefill_only: bool = False
) -> tuple[str, float, int]:
    """(request id, seconds from add_request to the first token, that token)."""
    request_id = new_request_id("prefill")
    start = time.perf_counter()
    engine.add_request(request_id, prompt, greedy_params(1), prefill_only=prefill_only)
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id and out.new_token_ids:
                return request_id, time.perf_counter() - start, out.new_token_ids[0]
    raise RuntimeError(f"request {request_id}: finished without a token")


# ---- the parts ----------------------------------------------------------------------------------


def measure_decode(
    engine: LLMEngine, hf: HFGenerate, prompt: list[int], config: EngineBenchConfig
) -> dict:
    num_tokens = config.num_new_tokens
    runners = {
        "baton": lambda n: baton_generate(engine, prompt, n),
        "hf_generate": lambda n: hf(prompt, 1, n),
    }
    for run in runners.values():
        run(num_tokens)  # warm-up
    first = {name: float("inf") for name in runners}
    total = dict(first)
    tokens: dict[str, list[int]] = {}
    for repeat in range(config.num_repeats):
        logger.info("decode: Baton and HF generate (batch 1), repeat %d/%d", repeat + 1,
                    config.num_repeats)
        for name, run in runners.items():
            first[name] = min(first[name], run(1)[0])
            elapsed, tokens[name] = run(num_tokens)
            total[name] = min(total[name], elapsed)
    result: dict = {"prompt_tokens": len(prompt), "new_tokens": num_tokens}
    for name in runners:
        result[name] = {
            "first_token_s": first[name],
            "total_s": total[name],
            "decode_tokens_per_s": (num_tokens - 1) / max(total[name] - first[name], 1e-9),
        }
    identical = tokens["baton"] == tokens["hf_generate"]
    result["outputs_identical"] = identical
    if not identical:
        index = next((i for i, (a, b) in enumerate(zip(tokens["baton"], tokens["hf_generate"]))
                      if a != b), min(len(tokens["baton"]), len(tokens["hf_generate"])))
        result["first_difference_at"] = index
        logger.warning("decode: Baton and HF generate differ from new token %d on", index)
    logger.info("decode: Baton %.1f tokens/s, HF generate %.1f tokens/s, identical: %s",
                result["baton"]["decode_tokens_per_s"],
                result["hf_generate"]["decode_tokens_per_s"], identical)
    return result


def measure_batch(
    engine: LLMEngine, hf: HFGenerate, prompt: list[int], config: EngineBenchConfig,
    hf_batch_sizes: tuple[int, ...],
) -> dict:
    num_tokens = config.num_new_tokens
    for batch_size in hf_batch_sizes:
        hf(prompt, batch_size, 2)  # warm-up at this shape
    hf_first = {b: float("inf") for b in hf_batch_sizes}
    hf_total = dict(hf_first)
    baton_rate = {c: 0.0 for c in config.concurrency}
    preemptions_before = engine.stats.num_preemptions
    for repeat in range(config.num_repeats):
        for size in sorted(set(hf_batch_sizes) | set(config.concurrency)):
            if size in hf_first:
                logger.info("batch: HF generate at batch %d, repeat %d/%d", size, repeat + 1,
                            config.num_repeats)
                hf_first[size] = min(hf_first[size], hf(prompt, size, 1)[0])
                hf_total[size] = min(hf_total[size], hf(prompt, size, num_tokens)[0])
            if size in baton_rate:
                logger.info("batch: Baton at %d concurrent requests, repeat %d/%d", size,
                            repeat + 1, config.num_repeats)
                rate = baton_decode_rate(engine, prompt, size, num_tokens - 1)
                baton_rate[size] = max(baton_rate[size], rate)
    num_preemptions = engine.stats.num_preemptions - preemptions_before
    if num_preemptions:
        logger.warning("batch: %d preemptions (KV pool too small); Baton's rates are low",
                       num_preemptions)
    result = {
        "prompt_tokens": len(prompt),
        "new_tokens": num_tokens,
        "num_preemptions": num_preemptions,
        "baton": [{"concurrency": c, "tokens_per_s": r} for c, r in sorted(baton_rate.items())],
        "hf_generate": [
            {"batch_size": b, "first_token_s": hf_first[b], "total_s": hf_total[b],
             "tokens_per_s": b * (num_tokens - 1) / max(hf_total[b] - hf_first[b], 1e-9)}
            for b in sorted(hf_first)
        ],
    }
    for row in result["baton"]:
        logger.info("batch: Baton at %d: %.1f tokens/s", row["concurrency"], row["tokens_per_s"])
    for row in result["hf_generate"]:
        logger.info("batch: HF generate at %d: %.1f tokens/s", row["batch_size"],
                    row["tokens_per_s"])
    return result


def measure_prefill(engine: LLMEngine, mc: ModelConfig, config: EngineBenchConfig) -> list[dict]:
    """Rows of prompt_tokens, ttft_s, tokens_per_s, flops, flops_per_s (run adds ratio_to_gemm)."""
    rng = random.Random(0)  # a fresh random prompt every run: nothing is ever cached
    lengths = [n for n in config.prefill_lens if n < engine.max_model_len]
    for n in sorted(set(config.prefill_lens) - set(lengths)):
        logger.warning("prefill: %d tokens do not fit max_model_len %d; skipped", n,
                       engine.max_model_len)
    if not lengths:
        return []
    time_to_first_token(engine, random_prompt(rng, mc.vocab_size, min(lengths)))  # warm-up
    best = {n: float("inf") for n in lengths}
    for repeat in range(config.num_repeats):
        for n in lengths:
            logger.info("prefill: %d tokens, repeat %d/%d", n, repeat + 1, config.num_repeats)
            _, seconds, _ = time_to_first_token(engine, random_prompt(rng, mc.vocab_size, n))
            best[n] = min(best[n], seconds)
    rows = []
    for n in lengths:
        flops = roofline.prefill_flops(mc, n)
        rows.append({"prompt_tokens": n, "ttft_s": best[n], "tokens_per_s": n / best[n],
                     "flops": flops, "flops_per_s": flops / best[n]})
        logger.info("prefill: %d tokens in %.3f s, %.1f GFLOP/s", n, best[n], flops / best[n] / 1e9)
    return rows


def measure_machine(config: EngineBenchConfig) -> tuple[float, float]:
    """(GEMM FLOP/s, read bytes/s), each the best of a few runs."""
    logger.info("machine: timing %d^3 fp32 matmuls and sums over %d MiB", config.gemm_size,
                config.read_bytes >> 20)
    gemm = roofline.gemm_flops_per_s(config.gemm_size)
    read = roofline.read_bytes_per_s(config.read_bytes)
    logger.info("machine: %.1f GFLOP/s GEMM, %.1f GB/s read", gemm / 1e9, read / 1e9)
    return gemm, read


def run(config: EngineBenchConfig) -> dict:
    """Measure what config asks, write the results where it says, print the report; return them."""
    from baton.bench.prefix import measure_prefix

    start = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    load_before = roofline.load_average_1m()
    if load_before > 0.5 * (os.cpu_count() or 1):
        logger.warning("1-minute load average %.1f before the run: other work shares this machine, "
                       "so absolute rates will be low and the ratios noisier", load_before)
    model_dir = resolve_model(config.model, config.cache_dir)
    mc = ModelConfig.from_dir(model_dir)
    machine_samples = [measure_machine(config)]
    num_parameters = roofline.count_parameters(mc)
    weight_bytes = num_parameters * torch.finfo(torch.float32).bits // 8
    result: dict = {
        "benchmark": "engine",
        "model": config.model,
        "dtype": "float32",
        "device": "cpu",
        "parts": list(config.parts),
        "num_repeats": config.num_repeats,
        "num_parameters": num_parameters,
        "weight_bytes": weight_bytes,
        "machine": {},  # measured before every part and at the end, filled in below
        "memory_floor_tokens_per_s": None,
        "gemm_roofline_tokens_per_s": None,
        "command": config.command,
    }

    engine = make_engine(model_dir, config)
    prompt = chat_prompt_ids(model_dir)
    if "decode" in config.parts or "batch" in config.parts:
        hf = HFGenerate(model_dir)
        if "decode" in config.parts:
            result["decode"] = measure_decode(engine, hf, prompt, config)
            machine_samples.append(measure_machine(config))
        if "batch" in config.parts:
            # batch 1 of HF is the decode part's, when that runs
            sizes = tuple(b for b in config.hf_batch_sizes
                          if b != 1 or "decode" not in config.parts)
            result["batch"] = measure_batch(engine, hf, prompt, config, sizes)
            machine_samples.append(measure_machine(config))
        del hf
    if "prefill" in config.parts:
        result["prefill"] = measure_prefill(engine, mc, config)
        machine_samples.append(measure_machine(config))
    if "prefix" in config.parts:
        result["prefix"] = measure_prefix(engine, lambda: make_engine(model_dir, config), config)
    del engine
    machine_samples.append(measure_machine(config))
    # Others' work comes and goes: the roofline is the best the machine showed during the run.
    gemm = max(sample[0] for sample in machine_samples)
    read = max(sample[1] for sample in machine_samples)
    result["machine"] = {
        **roofline.machine_info(), "load_average_1m": [load_before, roofline.load_average_1m()],
        "gemm_size": config.gemm_size, "gemm_flops_per_s": gemm,
        "read_bytes": config.read_bytes, "read_bytes_per_s": read,
        "samples": [{"gemm_flops_per_s": g, "read_bytes_per_s": r} for g, r in machine_samples],
    }
    result["memory_floor_tokens_per_s"] = read / weight_bytes
    result["gemm_roofline_tokens_per_s"] = gemm / (2 * num_parameters)
    for row in result.get("prefill", []):
        row["ratio_to_gemm"] = row["flops_per_s"] / gemm
    logger.info("roofline: %.1f GFLOP/s GEMM, %.1f GB/s read (best during the run): memory "
                "floor %.1f tokens/s, GEMM roofline %.1f tokens/s", gemm / 1e9, read / 1e9,
                result["memory_floor_tokens_per_s"], result["gemm_roofline_tokens_per_s"])
    result["ratios"] = engine_report.ratios(result)
    result["wall_s"] = time.perf_counter() - start
    engine_report.emit(result, config.out_dir)
    return result
