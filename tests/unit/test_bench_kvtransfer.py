"""The KV transfer benchmark's options, arithmetic and report: the config names what is wrong, the
hidden share follows its definition, and the report renders a canned run and says what is
missing instead of failing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import types
from pathlib import Path

import pytest

from baton import cli
from baton.bench import kvtransfer_report
from baton.bench.kvtransfer_config import KVTransferBenchConfig, wire_bytes_per_token

pytestmark = pytest.mark.unit


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, words", [
    ({"parts": ("wire", "bogus")}, ["parts", "wire, ttft, hidden, quality", "bogus"]),
    ({"parts": ()}, ["parts", "non-empty"]),
    ({"num_repeats": 0}, ["num_repeats", "> 0"]),
    ({"wire_bytes": 1000}, ["wire_bytes", "46080", "1000"]),
    ({"prompt_lens": (256, 0)}, ["prompt_lens", "positive"]),
    ({"prompt_lens": ()}, ["prompt_lens", "positive"]),
    ({"quality_num_tokens": -1}, ["quality_num_tokens", "> 0"]),
    ({"num_threads": 0}, ["num_threads", "> 0"]),
])
def test_config_errors_name_the_field(change, words):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(KVTransferBenchConfig(), **change)
    for word in words:
        assert word in str(info.value)


def test_the_wire_geometry_is_smollm2s_and_the_quick_run_is_smaller():
    assert wire_bytes_per_token() == 30 * 2 * 3 * 64 * 4  # layers x (K, V) x heads x dim x fp32
    full, quick = KVTransferBenchConfig(), KVTransferBenchConfig().quick()
    assert full.wire_bytes == 64 << 20 and full.prompt_lens == (256, 1024, 2048)
    assert quick.num_repeats == 1 and quick.wire_bytes < full.wire_bytes
    assert max(quick.prompt_lens) < max(full.prompt_lens)


# ---- the hidden share ---------------------------------------------------------------------------


@pytest.mark.parametrize("ttft, local, transfer, share", [
    (1.5, 1.0, 2.0, 0.75),  # 0.5 s of a 2 s transfer exposed
    (1.0, 1.0, 2.0, 1.0),  # nothing added to the local TTFT: all hidden
    (0.75, 1.0, 2.0, 1.0),  # faster than local (noise): clipped to 1
    (3.0, 1.0, 2.0, 0.0),  # the whole transfer added
    (4.0, 1.0, 2.0, 0.0),  # more than the transfer added (round trips): clipped to 0
    (1.5, 1.0, 0.0, None),  # nothing to hide
])
def test_hidden_share_is_one_minus_exposed_over_transfer_clipped(ttft, local, transfer, share):
    assert kvtransfer_report.hidden_share(ttft, local, transfer) == share


def test_a_hidden_row_keeps_its_inputs_and_the_exposed_time():
    assert kvtransfer_report.hidden_row(2048, 94_371_840, 7.5, 6.0, 2.0) == {
        "prompt_tokens": 2048, "kv_bytes": 94_371_840, "ttft_disaggregated_s": 7.5,
        "ttft_local_s": 6.0, "transfer_s": 2.0, "exposed_s": 1.5, "hidden_share": 0.25,
    }


# ---- the report ---------------------------------------------------------------------------------


def full_result() -> dict:
    stages = {name: {"seconds": s, "bytes_per_s": 64e6 / s}
              for name, s in (("encode", 0.1), ("grpc", 0.2), ("decode", 0.05), ("write", 0.05))}
    ttft = [{"prompt_tokens": n, "kv_bytes": n * 46080, "kv_bytes_received": float(n * 46080),
             "disaggregated_s": d, "local_s": loc, "ratio_disaggregated_over_local": d / loc}
            for n, d, loc in ((256, 0.75, 0.5), (1024, 2.5, 2.0), (2048, 6.0, 5.0))]
    hidden = [kvtransfer_report.hidden_row(n, n * 46080, d, p, t)
              for n, d, p, t in ((256, 0.75, 0.5, 0.25), (1024, 2.5, 2.0, 1.0),
                                 (2048, 6.0, 5.0, 2.0))]
    return {
        "model": "m", "dtype": "float32", "num_repeats": 3, "command": "baton bench kvtransfer",
        "machine": {"cpu_count": 2, "torch_threads": 2, "processor": "x86_64", "torch": "2",
                    "python": "3", "load_average_1m": [1.0, 2.0]},
        "wire": {"geometry": {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
                              "dtype": "float32"},
                 "num_tokens": 1456, "num_bytes": 64_000_000, "num_chunks": 91,
                 "push_s": 0.4, "push_bytes_per_s": 1.6e8, "copy_s": 0.01,
                 "copy_bytes_per_s": 6.4e9, "stages": stages, "bottleneck": "grpc",
                 "ratio_push_over_copy": 0.025, "ring_push_s": 0.025,
                 "ring_push_bytes_per_s": 2.56e9, "ratio_ring_push_over_copy": 0.4},
        "ttft": ttft,
        "hidden": hidden,
        "quality": {"num_prompts": 4, "num_tokens": 8,
                    "figures": {"num_prompts": 4, "num_identical": 3, "share_identical": 0.75,
                                "mean_share_before_divergence": 0.9,
                                "max_abs_logit_diff_teacher_forced": 0.25,
                                "max_abs_logit_diff_first_step": 0.125, "max_abs_logit": 20.0,
                                "by_kind": {"chat": {"num_prompts": 2, "num_identical": 2},
                                            "random": {"num_prompts": 2, "num_identical": 1}},
                                "kv_bytes_none": 4_000_000, "kv_bytes_int8": 1_000_000,
                                "bytes_ratio": 0.25}},
    }


def test_the_tracked_ratios():
    assert kvtransfer_report.ratios(full_result()) == {
        "ring_push_over_copy": 0.4,
        "push_over_copy": 0.025,
        "ttft_disaggregated_over_local_256": 1.5,
        "ttft_disaggregated_over_local_1024": 1.25,
        "ttft_disaggregated_over_local_2048": 1.2,
        "hidden_share_2048": 0.5,  # exposed 1.0 s of a 2.0 s transfer
        "int8_bytes_ratio": 0.25,
        "int8_greedy_agreement": 0.75,
    }


def test_the_report_names_every_ratio_its_target_and_each_part(tmp_path):
    result = full_result()
    result["ratios"] = kvtransfer_report.ratios(result)
    markdown = kvtransfer_report.render_markdown(result)
    for label in kvtransfer_report.RATIOS.values():
        assert label in markdown
    assert "shared memory ÷ in-process copy, GB/s | 0.40 | ≥ 0.30: met |" in markdown
    assert "gRPC stream ÷ in-process copy, GB/s | 0.03 |  |" in markdown  # no target
    assert "2048-token prompt | 1.20 | ≤ 1.15: **missed** |" in markdown
    assert "| **push through shared memory, end to end** | 0.025 | 2.56 | |" in markdown
    assert "| **push in the gRPC stream, end to end** | 0.400 | 0.16 | |" in markdown
    assert "| gRPC (serialize, loopback, parse) | 0.200 | 0.32 | 50% |" in markdown
    assert "The stream's slowest stage: **gRPC (serialize, loopback, parse)**" in markdown
    assert "| 1024 | 47.2 | 47.2 | 2.500 | 2.000 | 1.25 |" in markdown
    assert "**hidden share = 1 - exposed / transfer**" in markdown
    assert "| 2048 | 94.4 | 6.000 | 5.000 | 1.000 | 2.000 | 0.50 |" in markdown
    assert "| | all | chat | random |" in markdown
    assert "| prompts with identical greedy tokens | 3 | 2 | 1 |" in markdown
    assert "ratio **0.250**" in markdown
    assert kvtransfer_report.render_plot(result, tmp_path / "kvtransfer.png")
    assert (tmp_path / "kvtransfer.png").read_bytes()[:4] == b"\x89PNG"


def test_a_partial_run_reports_what_it_has():
    result = full_result()
    for part in ("ttft", "hidden"):
        del result[part]
    del result["quality"]
    result["ratios"] = kvtransfer_report.ratios(result)
    assert [k for k, v in result["ratios"].items() if v is not None] == [
        "ring_push_over_copy", "push_over_copy"]
    markdown = kvtransfer_report.render_markdown(result)
    assert "## Wire" in markdown and "## Time to first token" not in markdown
    assert "2048-token prompt | - | ≤ 1.15 |" in markdown
    assert "## KV quality" not in markdown


def test_a_target_is_met_on_its_side_of_the_bound():
    assert kvtransfer_report._target("ring_push_over_copy", 0.3) == "≥ 0.30: met"
    assert kvtransfer_report._target("ttft_disaggregated_over_local_2048", 1.1) == "≤ 1.15: met"
    assert kvtransfer_report._target("push_over_copy", 0.03) == ""  # the stream path: reported
    assert kvtransfer_report._target("hidden_share_2048", 0.5) == ""


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture
def bench_runs(monkeypatch):
    """Stands in for the measuring module: records the config each run gets."""
    configs = []
    monkeypatch.setitem(sys.modules, "baton.bench.kvtransfer",
                        types.SimpleNamespace(run=configs.append))
    return configs


def test_arguments_become_the_config(bench_runs, tmp_path):
    assert cli.main(["bench", "kvtransfer", "--only", "wire,hidden", "--repeats", "5",
                     "--threads", "2"]) == 0
    assert cli.main(["bench", "kvtransfer"]) == 0
    assert cli.main(["bench", "kvtransfer", "--quick", "--out-dir", str(tmp_path)]) == 0
    partial, full, quick = bench_runs
    assert (partial.parts, partial.num_repeats, partial.num_threads) == (("wire", "hidden"), 5, 2)
    assert partial.out_dir is None  # a partial run writes only where --out-dir says
    assert partial.command == "baton bench kvtransfer --only wire,hidden --repeats 5 --threads 2"
    assert full.out_dir == Path("docs") / "benchmarks"
    assert quick == dataclasses.replace(KVTransferBenchConfig().quick(), out_dir=tmp_path,
                                        command=quick.command)


def test_a_bad_part_is_refused_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "kvtransfer", "--only", "wire,bogus"])
    assert info.value.code == 2
    assert "wire, ttft, hidden, quality" in capsys.readouterr().err


def test_the_script_help_explains_each_part_without_loading_torch():
    repo = Path(__file__).resolve().parents[2]
    code = ("import runpy, sys\nsys.argv = ['kvtransfer.py', '--help']\n"
            "try:\n    runpy.run_path('benchmarks/kvtransfer.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=repo)
    for word in ("wire", "ttft", "hidden", "quality", "--quick", "--only", "in-process copy",
                 "1 - (disaggregated TTFT - local TTFT)", "docs/benchmarks"):
        assert word in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "False"
