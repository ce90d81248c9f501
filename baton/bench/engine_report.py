"""The engine benchmark's results as the project reads them: ratios, markdown, a plot. Torch-free.

Input is the result dict of baton.bench.engine.run (also engine.json); parts that did not run are
absent from it and from the report. A ratio that needs a missing number is None (null in JSON,
"-" in the markdown). matplotlib draws with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path

from baton.bench.report import div, fmt, machine_summary, plot_panels
from baton.bench.report import emit as emit_results

RATIOS = {  # key -> what the markdown calls it
    "decode_over_memory_floor": "single-stream decode ÷ memory floor",
    "decode_over_hf_batch1": "single-stream decode ÷ HF generate at batch 1",
    "batch32_over_hf_batch32": "decode at 32 concurrent ÷ HF generate at batch 32",
    "batch64_over_gemm_roofline": "decode at 64 concurrent ÷ GEMM roofline",
    "prefill512_over_gemm_roofline": "prefill of 512 tokens, FLOP/s ÷ GEMM FLOP/s",
    "prefix_prefill_role_cached_over_cold": "prefill role: cached ÷ cold time to first token",
    "prefix_decode_role_cached_over_cold": "decode role: cached ÷ cold time from reserve to commit",
    "outputs_identical_to_hf": "outputs token-identical to HF generate (batch 1)",
}


def _row(rows: list[dict], key: str, value: int) -> dict | None:
    return next((row for row in rows if row[key] == value), None)


def ratios(r: dict) -> dict:
    decode, batch = r.get("decode"), r.get("batch") or {}
    baton_rate = {row["concurrency"]: row["tokens_per_s"] for row in batch.get("baton", [])}
    hf_rate = {row["batch_size"]: row["tokens_per_s"] for row in hf_rows(r)}
    prefill_512 = _row(r.get("prefill", []), "prompt_tokens", 512)
    prefix = r.get("prefix") or {}
    single = decode["baton"]["decode_tokens_per_s"] if decode else None
    return {
        "decode_over_memory_floor": div(single, r["memory_floor_tokens_per_s"]),
        "decode_over_hf_batch1": div(single, hf_rate.get(1)),
        "batch32_over_hf_batch32": div(baton_rate.get(32), hf_rate.get(32)),
        "batch64_over_gemm_roofline": div(baton_rate.get(64), r["gemm_roofline_tokens_per_s"]),
        "prefill512_over_gemm_roofline": prefill_512["ratio_to_gemm"] if prefill_512 else None,
        "prefix_prefill_role_cached_over_cold":
            (prefix.get("prefill_role") or {}).get("ratio_cached_over_cold"),
        "prefix_decode_role_cached_over_cold":
            (prefix.get("decode_role") or {}).get("ratio_cached_over_cold"),
        "outputs_identical_to_hf": decode["outputs_identical"] if decode else None,
    }


def hf_rows(r: dict) -> list[dict]:
    """HF generate's batch rows, batch 1 taken from the decode part when that ran."""
    rows = list((r.get("batch") or {}).get("hf_generate", []))
    decode = r.get("decode")
    if decode and _row(rows, "batch_size", 1) is None:
        hf = decode["hf_generate"]
        rows.append({"batch_size": 1, "first_token_s": hf["first_token_s"],
                     "total_s": hf["total_s"], "tokens_per_s": hf["decode_tokens_per_s"]})
    return sorted(rows, key=lambda row: row["batch_size"])


def render_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Engine benchmark",
        "",
        (f"`{r['command']}` — {r['model']}, {r['dtype']} on CPU, "
         f"{r['num_parameters'] / 1e6:.1f}M parameters ({r['weight_bytes'] / 1e6:.0f} MB of "
         f"weights), best of {r['num_repeats']} interleaved runs. Every number comes from this "
         "one run on this one machine; the ratios are what the project tracks (absolute rates "
         "are meaningful only on a GPU)."),
        "",
        "| ratio | value |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {fmt(r['ratios'][key])} |" for key, label in RATIOS.items()]
    lines += [
        "",
        "## Machine",
        "",
        f"- {machine_summary(m)}",
        (f"- fp32 GEMM ({m['gemm_size']}² matmul): {m['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s. "
         f"Memory read (x.sum() over {m['read_bytes'] >> 20} MiB of float32): "
         f"{m['read_bytes_per_s'] / 1e9:.1f} GB/s. Each the best the machine showed in the run "
         f"(measured {len(m.get('samples', ())) or 2} times: before every part and at the end), "
         "so a busy moment cannot lower the roofline and flatter the ratios."),
        (f"- Memory floor, one stream reading all weights per token: "
        f"**{r['memory_floor_tokens_per_s']:.1f} tokens/s**. GEMM roofline, 2 FLOPs per parameter "
        f"per token: **{r['gemm_roofline_tokens_per_s']:.1f} tokens/s**."),
    ]
    if "decode" in r:
        d = r["decode"]
        lines += [
            "", "## Decode, one stream", "",
            f"{d['prompt_tokens']}-token chat prompt, {d['new_tokens']} new tokens, greedy.", "",
            "| | decode tokens/s | ÷ memory floor |", "|---|---:|---:|",
        ]
        for name, label in (("baton", "Baton engine"), ("hf_generate", "HF generate, batch 1")):
            rate = d[name]["decode_tokens_per_s"]
            lines.append(f"| {label} | {rate:.1f} | {rate / r['memory_floor_tokens_per_s']:.2f} |")
        lines += ["", f"Outputs token-identical: {fmt(d['outputs_identical'])}."]
    if "batch" in r:
        b = r["batch"]
        baton = {row["concurrency"]: row["tokens_per_s"] for row in b["baton"]}
        hf = {row["batch_size"]: row["tokens_per_s"] for row in hf_rows(r)}
        lines += [
            "", "## Batched decode", "",
            (f"Aggregate decode tokens/s, {b['prompt_tokens']}-token prompt, {b['new_tokens']} new "
            f"tokens, prefill excluded; {b['num_preemptions']} preemptions."), "",
            "| concurrent requests | Baton | HF generate | Baton ÷ HF | Baton ÷ GEMM roofline |",
            "|---:|---:|---:|---:|---:|",
        ]
        for size in sorted(set(baton) | set(hf)):
            lines.append(
                f"| {size} | {fmt(baton.get(size), 1)} | {fmt(hf.get(size), 1)} | "
                f"{fmt(div(baton.get(size), hf.get(size)))} | "
                f"{fmt(div(baton.get(size), r['gemm_roofline_tokens_per_s']))} |")
    if r.get("prefill"):
        lines += [
            "", "## Prefill", "",
            "| prompt tokens | time to first token (s) | tokens/s | GFLOP/s | ÷ GEMM FLOP/s |",
            "|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {p['prompt_tokens']} | {p['ttft_s']:.3f} | {p['tokens_per_s']:.0f} | "
                  f"{p['flops_per_s'] / 1e9:.1f} | {p['ratio_to_gemm']:.2f} |"
                  for p in r["prefill"]]
    if "prefix" in r:
        p = r["prefix"]
        lines += [
            "", "## Prefix cache", "",
            (f"{p['prompt_tokens']}-token prompt whose first {p['num_prefix_tokens']} tokens the "
            "engine has cached, against one it has never seen."), "",
            "| role | tokens cached | cached (s) | cold (s) | cached ÷ cold |",
            "|---|---:|---:|---:|---:|",
        ]
        for role in ("prefill_role", "decode_role"):
            row = p[role]
            lines.append(f"| {role.replace('_', ' ')} | {row['num_cached_tokens']} | "
                         f"{fmt(row['cached_s'], 3)} | {row['cold_s']:.3f} | "
                         f"{fmt(row['ratio_cached_over_cold'])} |")
        lines += [f"\n{role.replace('_', ' ').capitalize()}: not available: {p[role]['reason']}."
                  for role in ("prefill_role", "decode_role") if not p[role]["available"]]
    lines += ["", METHOD, "",
              "![decode, prefill and prefix cache against the roofline](engine.png)", ""]
    return "\n".join(lines)


METHOD = """\
## How each number was measured

- **Single-stream decode**: the same prompt through Baton's LLMEngine (add_request, step) and
  transformers `generate()` (greedy, exactly N new tokens), each timed for 1 and for N new tokens;
  decode tokens/s = (N - 1) / (time for N - time for 1), so the prefill is excluded on both sides.
- **Batched decode**: HF generate on the prompt repeated B times, B (N - 1) / (t_N - t_1). Baton:
  C requests added together, stepped until every one has its first token, then N - 1 decode steps
  timed; tokens produced / time.
- **Prefill**: one request with a fresh random prompt, max_tokens=1, from add_request to the first
  token. FLOPs: 2 per weight per token for the decoder layers' matmuls, 4 x head_dim per causal
  query-key pair per head and layer for attention, and the logits of the last token.
- **Prefix cache**: the prefill role runs add_request(prefill_only=True) to the first token (the
  colocated path is the same computation); the decode role times its part of the first token's
  path, reserve to commit: the K/V of exactly the tokens reserve() did not report cached (read
  from the prefill-role engine beforehand) goes through the KVTransfer wire format (encoded as the
  prefill worker sends it, decoded and validated as the receiver does) into write_kv, then
  commit(first token). The first decode step, the same either way, is not timed.
- Each timing is the best of the repeats, interleaved between the sides compared."""


def render_plot(r: dict, path: Path) -> bool:
    """Draw engine.png; False when the run has nothing to plot."""
    plots = {"batch": _plot_decode, "prefill": _plot_prefill, "prefix": _plot_prefix}
    names = [name for name in plots if r.get(name) or (name == "batch" and "decode" in r)]
    return plot_panels(r, path, [(name, plots[name]) for name in names])


def _plot_decode(ax, r: dict) -> None:
    from matplotlib.ticker import LogLocator, ScalarFormatter

    batch = r.get("batch") or {}
    baton = [(row["concurrency"], row["tokens_per_s"]) for row in batch.get("baton", [])]
    if not baton and "decode" in r:
        baton = [(1, r["decode"]["baton"]["decode_tokens_per_s"])]
    hf = [(row["batch_size"], row["tokens_per_s"]) for row in hf_rows(r)]
    sizes = sorted({size for size, _ in baton + hf})
    roof, floor = r["gemm_roofline_tokens_per_s"], r["memory_floor_tokens_per_s"]
    ax.plot(*zip(*baton), "o-", label="Baton engine")
    if hf:
        ax.plot(*zip(*hf), "s-", label="HF generate")
    ax.axhline(roof, color="k", linestyle=":", label=f"GEMM roofline {roof:.0f}")
    ax.plot(sizes, [min(size * floor, roof) for size in sizes], "k--", linewidth=1,
            label=f"memory floor x requests ({floor:.0f} for one)")
    ax.set(xscale="log", yscale="log", xlabel="concurrent requests (batch)",
           ylabel="decode tokens/s", title="Decode")
    ax.set_xticks(sizes, [str(size) for size in sizes], minor=False)
    ax.minorticks_off()
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.legend(fontsize=8)


def _plot_prefill(ax, r: dict) -> None:
    rows = r["prefill"]
    gemm = r["machine"]["gemm_flops_per_s"] / 1e9
    ax.plot([p["prompt_tokens"] for p in rows], [p["flops_per_s"] / 1e9 for p in rows], "o-",
            label="Baton prefill")
    ax.axhline(gemm, color="k", linestyle=":", label=f"GEMM {gemm:.0f} GFLOP/s")
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="GFLOP/s", title="Prefill", ylim=(0, None))
    ax.set_xticks([p["prompt_tokens"] for p in rows], [str(p["prompt_tokens"]) for p in rows])
    ax.minorticks_off()
    ax.legend(fontsize=8)


def _plot_prefix(ax, r: dict) -> None:
    p = r["prefix"]
    roles = ("prefill_role", "decode_role")
    x = range(len(roles))
    ax.bar([i - 0.2 for i in x], [p[role]["cold_s"] for role in roles], 0.4, label="cold")
    ax.bar([i + 0.2 for i in x], [p[role]["cached_s"] or 0 for role in roles], 0.4,
           label=f"first {p['num_prefix_tokens']} tokens cached")
    ax.set_xticks(list(x), [role.replace("_", " ") + ("" if p[role]["available"] else "\n(n/a)")
                            for role in roles])
    ax.set(ylabel="seconds to first token", title="Prefix cache")
    ax.legend(fontsize=8)


def emit(r: dict, out_dir: Path | None) -> None:
    """Print the markdown on stdout; write engine.json, .md and .png to out_dir if given."""
    emit_results(r, out_dir, "engine", render_markdown(r), render_plot)
