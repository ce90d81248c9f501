"""What the benchmarks' reports share: number formatting, a ratio that tolerates a missing value,
and writing a run's results (JSON, markdown, PNG). Torch-free; matplotlib only inside plots.

A ratio that needs a missing number is None (null in JSON, "-" in the markdown).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | bool | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    return f"{value:.{digits}f}"


def emit(r: dict, out_dir: Path | None, name: str, markdown: str,
         render_plot: Callable[[dict, Path], bool]) -> None:
    """Print the markdown on stdout; write <name>.json, .md and .png to out_dir if given."""
    sys.stdout.write(markdown)
    sys.stdout.flush()
    if out_dir is None:
        logger.info("results not written (a partial or quick run); pass --out-dir to keep them")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    if render_plot(r, out_dir / f"{name}.png"):
        logger.info("wrote %s/%s.{json,md,png}", out_dir, name)
    else:
        logger.info("wrote %s/%s.{json,md}", out_dir, name)


def machine_summary(m: dict) -> str:
    """One sentence on the machine of a run: m is roofline.machine_info() plus load_average_1m,
    [before, after]."""
    return (f"{m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, {m['processor']}, "
            f"torch {m['torch']}, Python {m['python']}; 1-minute load average "
            f"{m['load_average_1m'][0]:.1f} before and {m['load_average_1m'][1]:.1f} after "
            "(others' work shares the machine).")


def plot_panels(r: dict, path: Path, panels: list[tuple[str, Callable]],
                title: str | None = None) -> bool:
    """One row of plots, panel(ax, r) each, titled (by default with the model and machine),
    saved to path; False when there is no panel."""
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (_, panel) in zip(axes[0], panels):
        panel(ax, r)
    fig.suptitle(title or f"{Path(r['model']).name}, float32, {r['machine']['cpu_count']} CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
