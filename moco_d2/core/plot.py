"""Curves of one or more runs from their ``metrics.jsonl`` (pretraining, lincls or supervised).

Every scalar a run logged gets a panel (loss, contrastive or classification accuracy, lr, images/s,
data-wait fraction, kNN / val top-1, ...), against the iteration; several runs share the panels, so
two recipes or a resumed and an uninterrupted run can be compared at a glance. TensorBoard reads the
same numbers from the ``events.*`` files; this is for a PNG in a report or a terminal-only machine.

    python -m moco_d2.core.plot output/pretrain [output/moco800 ...] [--out curves.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moco_d2.core.errors import UserError, exit_on_user_error
from moco_d2.core.io import atomic_write
from moco_d2.core.metrics import read_metrics

SKIP = {"step", "time", "train/epoch", "val/epoch"}  # axes and bookkeeping, not curves


def load_run(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """``key -> (steps, values)`` for every numeric scalar in ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no metrics.jsonl (expected the OUTPUT_DIR of a training run)")
    try:
        records = read_metrics(path)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: line {exc.lineno} is not JSON") from None
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for key, value in r.items():
            if key in SKIP or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(r.get("step", len(steps))))
                values.append(float(value))
    if not curves:
        raise UserError(f"{path} holds no scalar metrics yet")
    return curves


def plot_runs(run_dirs: list[str], out: str | Path) -> list[str]:
    """One PNG with a panel per metric and a line per run; returns the panel titles in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {str(d): load_run(d) for d in run_dirs}
    keys = sorted({k for curves in runs.values() for k in curves})
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, curves in runs.items():
            if key in curves:
                steps, values = curves[key]
                ax.plot(steps, values, "o-" if len(steps) < 30 else "-", ms=3, label=Path(name).name or name)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, dpi=110, format="png"), what="plot")
    plt.close(fig)
    return keys


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="OUTPUT_DIRs of training runs (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG to write (default: <first run>/curves.png)")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.runs[0]) / "curves.png")
    keys = plot_runs(args.runs, out)
    print(f"wrote {out}: {len(keys)} panels ({', '.join(keys)})")


if __name__ == "__main__":
    main()
