"""Single-stream decode speed of the Baton engine against HF transformers generate(), one run.

Both run the same model in float32 on the same prompt, greedy, for the same number of new tokens,
after a warm-up. Decode tokens/s = (N - 1) / (time for N tokens - time for 1 token), the fastest of
--repeats interleaved runs, so the prompt's prefill is excluded on both sides. The machine's memory read
bandwidth is measured too, giving the memory floor (weights read once per token) as a roofline.
Results: docs/benchmarks/engine.json and engine.md.

    python benchmarks/engine.py [--model smollm2-135m-instruct] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.request import SamplingParams
from engine.weights import DEFAULT_MODEL, resolve_model

logger = logging.getLogger("benchmarks.engine")
PROMPT = "Write a short story about a relay race in which the baton is a small robot."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, .gguf or HF dir")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="prepared-model cache")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "benchmarks")
    return parser.parse_args(argv)


def chat_prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def baton_generate(engine: LLMEngine, prompt: list[int], num_tokens: int) -> tuple[float, list[int]]:
    sampling = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    tokens: list[int] = []
    start = time.perf_counter()
    engine.add_request(f"bench-{time.monotonic_ns()}", prompt, sampling)
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return time.perf_counter() - start, tokens


def hf_generate(model, prompt: list[int], num_tokens: int) -> tuple[float, list[int]]:
    input_ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=num_tokens,
            min_new_tokens=0, do_sample=False, pad_token_id=0,
        )
    return time.perf_counter() - start, out[0, len(prompt):].tolist()


def measure(runners: dict, num_tokens: int, repeats: int) -> dict:
    """Time each runner for 1 and for num_tokens new tokens, interleaved, keeping the fastest run.

    Interleaving and the minimum keep the comparison fair on a machine shared with other work.
    """
    for run in runners.values():
        run(num_tokens)  # warm-up
    t_one = {name: float("inf") for name in runners}
    t_all = dict(t_one)
    tokens = {}
    for _ in range(repeats):
        for name, run in runners.items():
            t_one[name] = min(t_one[name], run(1)[0])
            elapsed, tokens[name] = run(num_tokens)
            t_all[name] = min(t_all[name], elapsed)
    return {
        name: {
            "first_token_s": t_one[name],
            "total_s": t_all[name],
            "decode_tokens_per_s": (num_tokens - 1) / (t_all[name] - t_one[name]),
            "tokens": tokens[name],
        }
        for name in runners
    }


def read_bandwidth_gbs() -> float:
    x = torch.ones(64 << 20)  # 256 MiB of float32
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, args.cache_dir)
    prompt = chat_prompt_ids(model_dir)
    load_before = os.getloadavg()[0]

    engine = LLMEngine(EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=256 << 20,
        num_threads=args.threads,
    ))
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    logger.info("timing Baton and HF generate, %d prompt tokens, %d new tokens, %d repeats",
                len(prompt), args.tokens, args.repeats)
    results = measure(
        {
            "baton": lambda n: baton_generate(engine, prompt, n),
            "hf_generate": lambda n: hf_generate(model, prompt, n),
        },
        args.tokens,
        args.repeats,
    )
    baton, hf = results["baton"], results["hf_generate"]

    bandwidth = read_bandwidth_gbs()
    floor = bandwidth * 1e9 / weight_bytes
    result = {
        "benchmark": "engine single-stream decode",
        "model": args.model,
        "dtype": "float32",
        "prompt_tokens": len(prompt),
        "new_tokens": args.tokens,
        "repeats": args.repeats,
        "baton": {k: v for k, v in baton.items() if k != "tokens"},
        "hf_generate": {k: v for k, v in hf.items() if k != "tokens"},
        "ratio_baton_over_hf": baton["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
        "outputs_identical": baton["tokens"] == hf["tokens"],
        "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": bandwidth,
        "memory_floor_tokens_per_s": floor,
        "ratio_baton_over_memory_floor": baton["decode_tokens_per_s"] / floor,
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m": [load_before, os.getloadavg()[0]],  # before, after: others' work
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "command": "python benchmarks/engine.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "engine.md").write_text(render_markdown(result))
    print(render_markdown(result))
    return 0


def render_markdown(r: dict) -> str:
    m = r["machine"]
    return f"""# Engine benchmark: single-stream decode

`{r["command"].strip()}` — {r["model"]}, {r["dtype"]}, greedy, {r["prompt_tokens"]}-token chat
prompt, {r["new_tokens"]} new tokens, best of {r["repeats"]} interleaved runs after a warm-up. Decode
tokens/s = (N - 1) / (time for N tokens - time for 1 token), so prefill is excluded on both sides.

| | decode tokens/s | first token (s) | {r["new_tokens"]} tokens (s) |
|---|---:|---:|---:|
| Baton engine | {r["baton"]["decode_tokens_per_s"]:.1f} | {r["baton"]["first_token_s"]:.3f} | {r["baton"]["total_s"]:.2f} |
| HF transformers generate (batch 1) | {r["hf_generate"]["decode_tokens_per_s"]:.1f} | {r["hf_generate"]["first_token_s"]:.3f} | {r["hf_generate"]["total_s"]:.2f} |

- **Baton / HF: {r["ratio_baton_over_hf"]:.2f}x**; outputs token-identical: {r["outputs_identical"]}.
- Memory floor (weights {r["weight_bytes"] / 1e6:.0f} MB read once per token at the measured
  {r["read_bandwidth_gb_s"]:.1f} GB/s): {r["memory_floor_tokens_per_s"]:.1f} tokens/s; Baton reaches
  {100 * r["ratio_baton_over_memory_floor"]:.0f}% of it.
- Machine: {m["cpu_count"]} CPU cores ({m["torch_threads"]} torch threads), {m["processor"]},
  torch {m["torch"]}, Python {m["python"]}; 1-minute load average {m["load_average_1m"][0]:.1f}
  before and {m["load_average_1m"][1]:.1f} after the run (other work shares the machine; the
  interleaved best-of-N timing keeps the ratio fair, the absolute rates are lower bounds).
"""


if __name__ == "__main__":
    raise SystemExit(main())
