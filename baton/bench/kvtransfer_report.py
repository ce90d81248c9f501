"""The KV transfer benchmark's results as the project reads them: the hidden-share arithmetic, the
tracked ratios with their targets, markdown, a plot. Torch-free.

Input is the result dict of baton.bench.kvtransfer.run (also kvtransfer.json); parts that did not
run are absent from it and from the report. A ratio that needs a missing number is None (null in
JSON, "-" in the markdown). matplotlib draws with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path

from baton.bench.report import div, fmt, machine_summary, plot_panels
from baton.bench.report import emit as emit_results

HEADLINE_LENS = (256, 1024, 2048)
RATIOS = {  # key -> what the markdown calls it
    "ring_push_over_copy": "loopback KV push through shared memory ÷ in-process copy, GB/s",
    "push_over_copy": "loopback KV push in the gRPC stream ÷ in-process copy, GB/s",
    **{f"ttft_disaggregated_over_local_{n}": f"time to first token, disaggregated ÷ local, "
       f"{n}-token prompt" for n in HEADLINE_LENS},
    "hidden_share_2048": "share of the KV transfer hidden under prefill, 2048-token prompt",
    "int8_bytes_ratio": "int8 KV bytes ÷ float32 KV bytes",
    "int8_greedy_agreement": "int8 KV: share of prompts whose greedy tokens equal float32's",
}
# The loopback target is on the path a prefill worker takes to a decode worker on its host.
TARGETS = {"ring_push_over_copy": (">=", 0.3), "ttft_disaggregated_over_local_2048": ("<=", 1.15)}
STAGE_LABELS = {"encode": "encode (tensor to bytes, CRC-32C, protobuf)",
                "grpc": "gRPC (serialize, loopback, parse)",
                "decode": "decode (validation, CRC-32C, bytes to tensor)",
                "write": "write (copy into the preallocated tensor)"}


def hidden_share(ttft_disaggregated_s: float, ttft_local_s: float, transfer_s: float) -> float | None:
    """1 - exposed / transfer, clipped to [0, 1], where exposed = ttft_disaggregated - ttft_local
    (the same router path and the same prefill; disaggregation adds the reservation round trip
    and whatever of the transfer is not hidden): 1 when disaggregation adds nothing, 0 when it
    adds the whole transfer (or more). None when there is no transfer time to hide."""
    if not transfer_s > 0:
        return None
    exposed = ttft_disaggregated_s - ttft_local_s
    return min(1.0, max(0.0, 1.0 - exposed / transfer_s))


def hidden_row(num_tokens: int, kv_bytes: int, ttft_disaggregated_s: float, ttft_local_s: float,
               transfer_s: float) -> dict:
    return {"prompt_tokens": num_tokens, "kv_bytes": kv_bytes,
            "ttft_disaggregated_s": ttft_disaggregated_s, "ttft_local_s": ttft_local_s,
            "transfer_s": transfer_s, "exposed_s": ttft_disaggregated_s - ttft_local_s,
            "hidden_share": hidden_share(ttft_disaggregated_s, ttft_local_s, transfer_s)}


def _row(rows: list[dict], value: int) -> dict | None:
    return next((row for row in rows if row["prompt_tokens"] == value), None)


def ratios(r: dict) -> dict:
    wire, ttft, hidden = r.get("wire"), r.get("ttft", []), r.get("hidden", [])
    figures = (r.get("quality") or {}).get("figures") or {}
    out = {"ring_push_over_copy": wire.get("ratio_ring_push_over_copy") if wire else None,
           "push_over_copy": wire["ratio_push_over_copy"] if wire else None}
    for n in HEADLINE_LENS:
        row = _row(ttft, n)
        out[f"ttft_disaggregated_over_local_{n}"] = (
            row["ratio_disaggregated_over_local"] if row else None)
    row = _row(hidden, 2048)
    out["hidden_share_2048"] = row["hidden_share"] if row else None
    out["int8_bytes_ratio"] = figures.get("bytes_ratio")
    out["int8_greedy_agreement"] = figures.get("share_identical")
    return out


def _target(key: str, value: float | None) -> str:
    if key not in TARGETS:
        return ""
    op, bound = TARGETS[key]
    text = f"{'≥' if op == '>=' else '≤'} {bound:.2f}"
    if value is None:
        return text
    met = value >= bound if op == ">=" else value <= bound
    return f"{text}: {'met' if met else '**missed**'}"


def render_markdown(r: dict) -> str:
    lines = [
        "# KV transfer benchmark",
        "",
        (f"`{r['command']}` — {r['model']}, {r['dtype']} on CPU, best of {r['num_repeats']} "
         "interleaved runs. Every number comes from this one run on this one machine; the ratios "
         "are what the project tracks."),
        "",
        "| ratio | value | target |",
        "|---|---:|---|",
    ]
    lines += [f"| {label} | {fmt(r['ratios'][key])} | {_target(key, r['ratios'][key])} |"
              for key, label in RATIOS.items()]
    lines += ["", "## Machine", "", f"- {machine_summary(r['machine'])}"]
    if "wire" in r:
        lines += _wire_section(r["wire"])
    if r.get("ttft"):
        lines += [
            "", "## Time to first token", "",
            ("A fresh random prompt, max_tokens=1, through the router's gRPC API (baton.Client), "
             "timed at the client from the call to the first token. Disaggregated: a router that "
             "knows 1 prefill and 1 decode worker (the prefill worker computes the prompt and "
             "pushes its KV to the decode worker). Local: a router that knows only the same "
             "decode worker, which prefills itself. KV moved: prompt tokens x bytes per token "
             "(received: the decode worker's kv_transfer_bytes counter)."), "",
            ("| prompt tokens | KV moved (MB) | received (MB) | disaggregated (s) | local (s) "
             "| disaggregated ÷ local |"), "|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {t['prompt_tokens']} | {t['kv_bytes'] / 1e6:.1f} | "
                  f"{fmt(div(t['kv_bytes_received'], 1e6), 1)} | {t['disaggregated_s']:.3f} | "
                  f"{t['local_s']:.3f} | {t['ratio_disaggregated_over_local']:.2f} |"
                  for t in r["ttft"]]
    if r.get("hidden"):
        lines += [
            "", "## Transfer hidden under prefill", "",
            ("transfer = the push of that prompt's KV alone (as the prefill worker pushes to the "
             "decode worker on its host: through a shared-memory ring, into a KVReceiver; the "
             "model's geometry); exposed = disaggregated TTFT - local TTFT (the same router "
             "path and the same prefill, on the decode worker itself); **hidden share = 1 - "
             "exposed / transfer**, clipped to [0, 1]. 1: the transfer costs the first token "
             "nothing; 0: all of it (and the reservation round trip) adds to it."), "",
            ("| prompt tokens | KV (MB) | disaggregated TTFT (s) | local TTFT (s) | exposed (s) "
             "| transfer alone (s) | hidden share |"), "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {h['prompt_tokens']} | {h['kv_bytes'] / 1e6:.1f} | "
                  f"{h['ttft_disaggregated_s']:.3f} | {h['ttft_local_s']:.3f} | {h['exposed_s']:.3f} "
                  f"| {h['transfer_s']:.3f} | {fmt(h['hidden_share'])} |" for h in r["hidden"]]
    if "quality" in r:
        lines += _quality_section(r["quality"])
    lines += ["", ("Workers and routers run in one process on loopback (they "
                   "share its GIL); each timing is the best of the repeats, interleaved between "
                   "the sides compared."), "",
              "![time to first token, wire stages and hidden share](kvtransfer.png)", ""]
    return "\n".join(lines)


def _wire_section(w: dict) -> list[str]:
    g = w["geometry"]
    num_bytes = w["num_bytes"]
    stages = w["stages"]
    total = sum(stage["seconds"] for stage in stages.values())
    lines = [
        "", "## Wire", "",
        (f"One push of {w['num_tokens']} tokens of KV ({num_bytes / 1e6:.1f} MB; {g['num_layers']} "
         f"layers, {g['num_kv_heads']} KV heads, head_dim {g['head_dim']}, {g['dtype']}) to a "
         "real KVReceiver whose write callback copies into a preallocated tensor, timed from the "
         "first chunk to the acknowledgement: through a shared-memory ring (kvtransfer.shm, "
         "4 MiB slots; what a prefill worker does for a decode worker on its host), and in the "
         f"gRPC stream ({w['num_chunks']} chunks encoded by kvtransfer.sender.iter_chunks, "
         "streamed with push_kv over loopback; between hosts). Against an in-process copy of the "
         "same bytes (torch copy_ into a preallocated tensor). Then each stage of the stream's "
         "push alone on the same chunks; in the push they overlap."), "",
        "| | seconds | GB/s | share of the stages |", "|---|---:|---:|---:|",
        (f"| **push through shared memory, end to end** | {fmt(w.get('ring_push_s'), 3)} | "
         f"{fmt(div(w.get('ring_push_bytes_per_s'), 1e9))} | |"),
        (f"| **push in the gRPC stream, end to end** | {w['push_s']:.3f} | "
         f"{w['push_bytes_per_s'] / 1e9:.2f} | |"),
        f"| in-process copy | {w['copy_s']:.4f} | {w['copy_bytes_per_s'] / 1e9:.2f} | |",
    ]
    lines += [f"| {STAGE_LABELS.get(name, name)} | {s['seconds']:.3f} | "
              f"{s['bytes_per_s'] / 1e9:.2f} | {s['seconds'] / total:.0%} |"
              for name, s in stages.items()]
    lines += ["", (f"Push ÷ copy: **{fmt(w.get('ratio_ring_push_over_copy'), 3)}** through "
                   f"shared memory, **{w['ratio_push_over_copy']:.3f}** in the gRPC stream. The "
                   "stream's slowest stage: "
                   f"**{STAGE_LABELS.get(w['bottleneck'], w['bottleneck'])}**.")]
    return lines


QUALITY_ROWS = {  # kv_quality's figure -> what the markdown calls it
    "num_prompts": "prompts",
    "num_identical": "prompts with identical greedy tokens",
    "share_identical": "share of prompts with identical greedy tokens",
    "mean_share_before_divergence": "mean share of tokens before the first divergence",
    "max_abs_logit_diff_teacher_forced": "largest logit difference, teacher-forced",
    "max_abs_logit_diff_first_step": "largest logit difference, first decode step",
    "max_abs_logit": "largest logit (for scale)",
}


def _quality_section(q: dict) -> list[str]:
    lines = ["", "## KV quality (int8)", ""]
    f = q["figures"]
    kinds = sorted(f.get("by_kind") or {})
    columns = [f, *(f["by_kind"][kind] for kind in kinds)]
    lines += [
        (f"baton.bench.kv_quality.measure_int8_quality: {q['num_prompts']} prompts, "
         f"{q['num_tokens']} greedy tokens each, decoded after a transfer of the prompt's KV as "
         "int8 and as float32 (the same first token), compared token by token and logit by "
         "logit."), "",
        "| | " + " | ".join(["all", *kinds]) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for key, label in QUALITY_ROWS.items():
        lines.append(f"| {label} | " + " | ".join(
            fmt(c.get(key), 3) if isinstance(c.get(key), float) else fmt(c.get(key), 0)
            for c in columns) + " |")
    lines += ["", (f"KV bytes on the wire: {fmt(div(f.get('kv_bytes_int8'), 1e6), 2)} MB as int8 "
                   f"(values and scales) against {fmt(div(f.get('kv_bytes_none'), 1e6), 2)} MB "
                   f"as float32: ratio **{fmt(f.get('bytes_ratio'), 3)}**.")]
    return lines


def render_plot(r: dict, path: Path) -> bool:
    """Draw kvtransfer.png; False when the run has nothing to plot."""
    plots = {"ttft": _plot_ttft, "wire": _plot_wire, "hidden": _plot_hidden}
    return plot_panels(r, path, [(name, plot) for name, plot in plots.items() if r.get(name)])


def _plot_ttft(ax, r: dict) -> None:
    rows = r["ttft"]
    lens = [row["prompt_tokens"] for row in rows]
    ax.plot(lens, [row["disaggregated_s"] for row in rows], "o-", label="disaggregated (1P + 1D)")
    ax.plot(lens, [row["local_s"] for row in rows], "s-", label="local prefill on D")
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="seconds to first token",
           title="Time to first token", ylim=(0, None))
    ax.set_xticks(lens, [str(n) for n in lens])
    ax.minorticks_off()
    ax.legend(fontsize=8)


def _plot_wire(ax, r: dict) -> None:
    w = r["wire"]
    ring = [("push, shared memory", w["ring_push_s"])] if w.get("ring_push_s") else []
    bars = [*ring, ("push, gRPC stream", w["push_s"]), ("in-process copy", w["copy_s"]),
            *((f"stream: {name}", s["seconds"]) for name, s in w["stages"].items())]
    names = [name for name, _ in bars]
    ax.barh(range(len(names)), [seconds * 1e3 for _, seconds in bars],
            color=[*["C0"] * (len(ring) + 1), "C2", *["C1"] * len(w["stages"])])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="milliseconds", title=f"Wire: {w['num_bytes'] / 1e6:.0f} MB of KV")


def _plot_hidden(ax, r: dict) -> None:
    rows = r["hidden"]
    x = range(len(rows))
    transfer = [row["transfer_s"] for row in rows]
    exposed = [max(row["exposed_s"], 0.0) for row in rows]
    ax.bar([i - 0.2 for i in x], transfer, 0.4, label="transfer alone")
    ax.bar([i + 0.2 for i in x], exposed, 0.4, label="exposed: disaggregated - local TTFT")
    for i, row in zip(x, rows):
        ax.annotate(f"hidden {fmt(row['hidden_share'])}", (i, max(transfer[i], exposed[i])),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [str(row["prompt_tokens"]) for row in rows])
    ax.set(xlabel="prompt tokens", ylabel="seconds", title="Transfer hidden under prefill")
    ax.legend(fontsize=8)


def emit(r: dict, out_dir: Path | None) -> None:
    """Print the markdown on stdout; write kvtransfer.json, .md and .png to out_dir if given."""
    emit_results(r, out_dir, "kvtransfer", render_markdown(r), render_plot)
