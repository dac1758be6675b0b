"""Repeat the detection fine-tuning with different seeds and report mean ± std.

    python -m detection.trials --config-file configs/voc_c4.yaml --weights moco.pkl --trials 5 \
        --num-gpus 8 --output output/voc [KEY VALUE ...]

Each trial is an independent ``detection/train_net.py`` run (its own process, ``SEED`` = base seed
+ trial index, output in ``OUTPUT/trial_<k>``, started with ``--resume`` so an interrupted trial
continues and a finished one is not repeated). The table of AP50/AP/AP75 goes to
``OUTPUT/results.md`` and ``OUTPUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from detection.config import load_detection_config
from detection.trainer import METRICS_FILE, write_strict_json
from moco_d2.core.errors import UserError, exit_on_user_error

TRAIN_NET = Path(__file__).resolve().parent / "train_net.py"
HEADLINE = ("AP50", "AP", "AP75")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarize_trials(trials: list[dict]) -> dict:
    """Aggregate per-trial metrics.json objects: mean/std of AP50, AP, AP75 and per-class AP50."""
    summary = {k: dict(zip(("mean", "std"), mean_std([t[k] for t in trials]))) for k in HEADLINE}
    classes = list(trials[0].get("per_class_AP50", {}))
    per_class = {}
    for c in classes:
        values = [t["per_class_AP50"][c] for t in trials if t["per_class_AP50"].get(c) is not None]
        if values:
            per_class[c] = dict(zip(("mean", "std"), mean_std(values)))
    return {"n": len(trials), **summary, "per_class_AP50": per_class}


def markdown_table(rows: list[dict], summary: dict) -> str:
    """One line per trial and a final mean ± std line."""
    lines = ["| trial | seed | AP50 | AP | AP75 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trial']} | {r['seed']} | " + " | ".join(f"{r[k]:.2f}" for k in HEADLINE) + " |")
    stats = " | ".join(f"{summary[k]['mean']:.2f} ± {summary[k]['std']:.2f}" for k in HEADLINE)
    lines.append(f"| mean ± std (n={summary['n']}) | | {stats} |")
    return "\n".join(lines) + "\n"


def read_finished(out_dir: Path, max_iter: int) -> dict | None:
    """The trial's metrics.json if it holds the final evaluation (after MAX_ITER iterations)."""
    path = out_dir / METRICS_FILE
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("iteration") == max_iter else None


def run_trial(args: argparse.Namespace, out_dir: Path, seed: int) -> None:
    cmd = [
        sys.executable,
        str(TRAIN_NET),
        "--config-file",
        args.config_file,
        "--num-gpus",
        str(args.num_gpus),
    ]
    cmd += ["--resume"]
    if args.weights is not None:
        cmd += ["MODEL.WEIGHTS", args.weights]
    cmd += [*args.opts, "SEED", str(seed), "OUTPUT_DIR", str(out_dir)]
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise UserError(f"trial in {out_dir} failed with exit code {rc}; see {out_dir / 'log.txt'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default=None, help="MODEL.WEIGHTS for every trial (default: the config's)")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="trial k uses SEED = seed + k")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--output", required=True)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every trial")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.trials < 1:
        raise UserError(f"--trials must be at least 1, got {args.trials}")
    for key in ("SEED", "OUTPUT_DIR"):
        if key in args.opts[::2]:
            raise UserError(f"{key} is set per trial by detection.trials; remove it from the overrides")
    opts = list(args.opts) + (["MODEL.WEIGHTS", args.weights] if args.weights is not None else [])
    max_iter = load_detection_config(args.config_file, opts).SOLVER.MAX_ITER  # also validates the config
    output = Path(args.output)
    rows, results = [], []
    for k in range(args.trials):
        out_dir, seed = output / f"trial_{k}", args.seed + k
        metrics = read_finished(out_dir, max_iter)
        if metrics is None:
            run_trial(args, out_dir, seed)
            metrics = read_finished(out_dir, max_iter)
            if metrics is None:
                raise UserError(f"trial in {out_dir} finished without a final {METRICS_FILE}")
        results.append(metrics)
        rows.append(
            {"trial": k, "seed": seed, "output_dir": str(out_dir), **{m: metrics[m] for m in HEADLINE}}
        )
    summary = summarize_trials(results)
    report = {"config_file": args.config_file, "weights": args.weights, "opts": args.opts, "trials": rows}
    report["summary"] = summary
    os.makedirs(output, exist_ok=True)
    write_strict_json(report, str(output / "results.json"))
    table = markdown_table(rows, summary)
    (output / "results.md").write_text(f"# {args.config_file}, weights {args.weights}\n\n{table}")
    print(table, end="")
    return report


if __name__ == "__main__":
    main()
