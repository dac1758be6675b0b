"""Write ``report.md`` (+ PNGs) from the outputs of a demo run, numbers exactly as measured."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from demo.compare import BEGIN, END, numbers
from demo.plan import MACHINE_FILE, NUMBERS_FILE, PRETRAIN_THREADS, ROW_TITLES, ROWS, Plan
from demo.stages import fmt_seconds, side_by_side_threads, wall_seconds
from demo.stats import sample_sd, welch_margin
from moco_d2.core.io import atomic_write, write_json_atomic
from moco_d2.core.metrics import read_metrics

if TYPE_CHECKING:
    from demo.stages import Stage

DET_COLUMNS = ("AP50", "AP", "AP75")
COLUMNS = ("kNN top-1", "linear top-1", *DET_COLUMNS)
# The paper's numbers in the same shape (ResNet-50, ImageNet-1M pretraining, 200 epochs; VOC07+12
# Faster R-CNN R50-C4, 24k iterations): MoCo v2 (Chen et al. 2020) Table 2, random init from
# MoCo (He et al. 2020) Table 2. kNN was not reported there.
PAPER = {
    "random_init": (None, None, 60.2, 33.8, 33.1),
    "supervised": (None, 76.5, 81.3, 53.5, 58.8),
    "moco_v1": (None, 60.6, 81.5, 55.9, 62.6),
    "moco_v2": (None, 67.5, 82.4, 57.0, 63.6),
}


def _machine_line() -> str:
    """CPU model, core count and the vector kernel set torch dispatches to (it changes float32 results)."""
    import torch

    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from moco_d2.core.threads import ONEDNN_ISA_VARIABLES

    line = f"{os.cpu_count()} CPU cores, {model}, ATen kernels {torch.backends.cpu.get_cpu_capability()}"
    onednn = next((f"{v}={os.environ[v]}" for v in ONEDNN_ISA_VARIABLES if os.environ.get(v)), None)
    return f"{line} ({onednn})" if onednn else line


def _lincls_recipe(plan: Plan) -> str:
    """How the linear classifier was trained, from its config (and how that differs from ImageNet's)."""
    from moco_d2.core.config import load_config
    from moco_d2.evaluation.lincls import lincls_defaults

    c = load_config(lincls_defaults(), plan.config("lincls"))
    s = c.SOLVER
    recipe = (
        f"frozen backbone in eval mode, new fc, SGD lr {s.BASE_LR:g} momentum {s.MOMENTUM:g} weight decay "
        f"{s.WEIGHT_DECAY:g}, batch {s.BATCH_SIZE}, {s.EPOCHS} epochs with lr x{s.GAMMA:g} at epochs "
        f"{', '.join(map(str, s.STEPS))}, the same for every row, final epoch reported."
    )
    if c.TRAIN.PRECOMPUTED_FEATURES:
        recipe += (
            " The features were computed once per image through the validation transform and the fc trained "
            "on them (`TRAIN.PRECOMPUTED_FEATURES`; the kNN stage extracted them and the linear stage read its "
            "file, `DATA.FEATURES_CACHE`); the ImageNet recipe instead shows each training image "
            "through RandomResizedCrop + flip, a new crop every epoch."
        )
    if c.TRAIN.STANDARDIZE_FEATURES:
        recipe += (
            " Each feature dimension was standardised with the training features' mean and std "
            "(`TRAIN.STANDARDIZE_FEATURES`, a BatchNorm without affine as in MAE's linear probe), so one lr "
            "suits every row's feature scale (the paper's lr 30 on raw features fits MoCo's ResNet-50 only)."
        )
    return recipe


def _backbone_line(arch: str) -> str:
    from moco_d2.core.backbone import ARCHS

    spec = ARCHS[arch]
    if spec.stock:
        return (
            f"- Backbone: torchvision {arch} (standard stem) everywhere; Detectron2 R{spec.depth}-C4 with res5 "
            "in the ROI head."
        )
    ch = "-".join(map(str, spec.stage_channels))
    st = "/".join(map(str, spec.stage_strides))
    return (
        f"- Backbone: `{arch}` everywhere (`moco_d2/core/backbone.py`): ResNet-{spec.depth} blocks with a "
        f"{spec.stem_kernel}x{spec.stem_kernel} stride-{spec.stem_stride} stem, no max-pool, {ch} channels, "
        f"res2..res5 at strides {st}; in Detectron2 the registered `build_small_resnet_backbone` "
        f"(res4 at stride {spec.stage_strides[2]} feeds the RPN and ROI pooler) with BasicBlock res5 in the "
        "ROI head."
    )


def pretrain_curves(metrics_jsonl: Path) -> dict:
    """Per-epoch mean loss and contrastive accuracy, and the kNN monitor's top-1 after each epoch."""
    records = read_metrics(metrics_jsonl)
    per_epoch: dict[int, list[tuple[float, float]]] = {}
    knn = []
    for r in records:
        if "train/loss" in r and isinstance(r["train/loss"], float):
            e = max(1, math.ceil(r["train/epoch"] - 1e-9))
            per_epoch.setdefault(e, []).append((r["train/loss"], r["train/acc1"]))
        if "knn/top1" in r:
            knn.append(float(r["knn/top1"]))
    epochs = sorted(per_epoch)
    return {
        "epochs": len(epochs),
        "epoch": epochs,
        "loss": [sum(v[0] for v in per_epoch[e]) / len(per_epoch[e]) for e in epochs],
        "acc1": [sum(v[1] for v in per_epoch[e]) / len(per_epoch[e]) for e in epochs],
        "knn": knn,
    }


def lincls_curve(metrics_jsonl: Path) -> list[float]:
    """The linear classifier's val top-1 after each epoch (empty when the stage has not run)."""
    if not metrics_jsonl.is_file():
        return []
    return [float(r["val/top1"]) for r in read_metrics(metrics_jsonl) if "val/top1" in r]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect_table(plan: Plan) -> dict[str, dict[str, float | None]]:
    """The measured table: row -> column -> value (None when the stage has no output).

    Detection columns are the mean over the row's fine-tuning seeds (``Plan.detection_seeds``).
    """
    w = plan.work
    table = {}
    for row in ROWS:
        knn = _load(w / "knn" / row / "knn_results.json") or {}
        lin = _load(w / "lincls" / row / "results.json") or {}
        table[row] = {"kNN top-1": knn.get("top1"), "linear top-1": lin.get("top1")}
        runs = detection_runs(plan, row)
        for col in DET_COLUMNS:
            table[row][col] = sum(r[col] for r in runs) / len(runs) if runs else None
    return table


def detection_runs(plan: Plan, row: str) -> list[dict]:
    """The finished fine-tuning runs of ``row`` (one metrics dict per seed)."""
    found = (_load(plan.detection_dir(row, s) / "metrics.json") for s in plan.detection_seeds(row))
    return [m for m in found if m]


def seed_values(plan: Plan) -> dict[str, dict[str, list[float]]]:
    """Row -> detection column -> the value of each finished fine-tuning seed (rows with a run only)."""
    values = {}
    for row in ROWS:
        runs = detection_runs(plan, row)
        if runs:
            values[row] = {c: [r[c] for r in runs] for c in DET_COLUMNS}
    return values


def seed_count(cols: dict[str, list[float]]) -> int:
    """How many fine-tuning seeds one row of ``seed_values`` holds (every column has one value per seed)."""
    return len(next(iter(cols.values())))


def half_ranges(seeds: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Half the range (max - min) / 2 of each detection column over seeds, for rows with >= 2 seeds."""
    return {
        row: {c: (max(v) - min(v)) / 2 for c, v in cols.items()}
        for row, cols in seeds.items()
        if seed_count(cols) >= 2
    }


def parse_table(markdown: str) -> dict[str, list[str]]:
    """Rows of the report's main table (between the RESULTS markers): title -> cell strings."""
    body = markdown.split("<!-- RESULTS -->", 1)[1].split("<!-- /RESULTS -->", 1)[0]
    rows = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, axes, out: Path) -> None:
    """Grid and legend on every axis, then write the figure and free it."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)


def _plot_curves(plan: Plan, out: Path, random_knn: float | None) -> bool:
    """Loss and contrastive accuracy per epoch of both MoCo runs, and the kNN monitor when it ran."""
    plt = _pyplot()
    curves = {}
    for v in ("moco_v2", "moco_v1"):
        path = plan.work / "pretrain" / v / "metrics.jsonl"
        if path.is_file():
            curves[v] = pretrain_curves(path)
    with_knn = any(c["knn"] for c in curves.values())
    fig, axes = plt.subplots(1, 3 if with_knn else 2, figsize=(12 if with_knn else 8, 3.4))
    for v, c in curves.items():
        colour, label = {"moco_v2": ("tab:red", "MoCo v2"), "moco_v1": ("tab:blue", "MoCo v1")}[v]
        axes[0].plot(c["epoch"], c["loss"], "o-", color=colour, label=label)
        axes[1].plot(c["epoch"], c["acc1"], "o-", color=colour, label=label)
        if with_knn:
            axes[2].plot(range(1, len(c["knn"]) + 1), c["knn"], "o-", color=colour, label=label)
    if with_knn and random_knn is not None:
        axes[2].axhline(random_knn, color="gray", ls="--", label="random init")
    for ax, title in zip(axes, ("InfoNCE loss", "contrastive top-1 (%)", "kNN top-1 on val (%)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    _save(fig, axes, out)
    return bool(curves)


def _plot_lincls(plan: Plan, out: Path) -> bool:
    """Val top-1 per epoch of each row's linear classifier: shows whether (and when) it converged."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 3.4))
    any_data = False
    for row in ROWS:
        curve = lincls_curve(plan.work / "lincls" / row / "metrics.jsonl")
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, label=ROW_TITLES[row])
            any_data = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("linear top-1 on val (%)")
    _save(fig, [ax], out)
    return any_data


def _plot_ap(table: dict, out: Path) -> None:
    """AP50 / AP / AP75 bars per row (seed means)."""
    rows = list(table)
    fig, ax = _pyplot().subplots(figsize=(6.5, 3.4))
    width = 0.27
    for i, (col, colour) in enumerate((("AP50", "tab:green"), ("AP", "tab:blue"), ("AP75", "tab:purple"))):
        vals = [table[r][col] if table[r][col] is not None else 0.0 for r in rows]
        bars = ax.bar([x + (i - 1) * width for x in range(len(rows))], vals, width, label=col, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rows)), [ROW_TITLES[r] for r in rows])
    ax.set_ylabel("box AP (%) on the test scenes")
    _save(fig, [ax], out)


def _margin(seeds: dict, col: str, a: str, b: str) -> float:
    """The gap between rows ``a`` and ``b`` in ``col`` that seed noise alone produces with 95 % probability
    (Welch's t-test, ``demo.stats``). A row fine-tuned with one seed has no spread of its own: it is given
    the largest standard deviation measured in the column, with one degree of freedom."""
    measured = [sample_sd(v[col]) for v in seeds.values() if len(v[col]) >= 2]
    worst = max(measured, default=0.0)
    sd = {r: sample_sd(seeds[r][col]) if len(seeds[r][col]) >= 2 else worst for r in (a, b)}
    return welch_margin(sd[a], len(seeds[a][col]), sd[b], len(seeds[b][col]))


def _order_link(table: dict, seeds: dict, col: str, a: str, b: str) -> tuple[float, float, int]:
    """Row ``a`` minus row ``b`` in ``col``, its noise margin, and the verdict: +1 beyond the spread
    above, -1 beyond it below, 0 within it."""
    gap, margin = table[a][col] - table[b][col], _margin(seeds, col, a, b)
    return gap, margin, (gap > margin) - (gap < -margin)


def _ordering(table: dict, seeds: dict, col: str) -> str:
    """The paper's ordering MoCo v2 >= MoCo v1 > random init on one column, read against the spread."""
    g21, m21, v21 = _order_link(table, seeds, col, "moco_v2", "moco_v1")
    g1r, m1r, v1r = _order_link(table, seeds, col, "moco_v1", "random_init")
    first = (
        f"MoCo v1 > random init beyond the spread ({g1r:+.1f}, ±{m1r:.1f})"
        if v1r > 0
        else f"MoCo v1 > random init NOT shown ({g1r:+.1f}, ±{m1r:.1f})"
    )
    second = {
        1: f"MoCo v2 > MoCo v1 beyond the spread ({g21:+.1f}, ±{m21:.1f})",
        0: f"MoCo v2 − MoCo v1 {g21:+.1f} is within the spread (±{m21:.1f}): a tie, which does not contradict "
        "v2 ≥ v1 but does not show v2 ahead either",
        -1: f"MoCo v2 < MoCo v1 beyond the spread ({g21:+.1f}, ±{m21:.1f}): v2 ≥ v1 does NOT hold",
    }[v21]
    return f"The paper's ordering MoCo v2 ≥ MoCo v1 > random init on {col}: {first}; {second}."


def _findings(table: dict, raw_knn: float | None, seeds: dict) -> list[str]:
    """Plain statements of what the numbers say, including where MoCo v2 does not win; detection gaps
    are interpreted only when they exceed the seed noise (``seeds``: ``seed_values``)."""
    lines = []
    v2, rnd = table["moco_v2"], table["random_init"]
    for col in ("kNN top-1", "linear top-1"):
        if v2[col] is None or rnd[col] is None:
            continue
        delta = v2[col] - rnd[col]
        verdict = "learned useful features" if delta > 0 else "did NOT beat random init"
        lines.append(
            f"MoCo v2 {verdict} by the {col.split()[0]} measure: {v2[col]:.1f} % vs {rnd[col]:.1f} % for the "
            f"same network at random init ({delta:+.1f} points)."
        )
    if raw_knn is not None and v2["kNN top-1"] is not None:
        delta = v2["kNN top-1"] - raw_knn
        rel = "above" if delta > 0 else "below"
        lines.append(
            f"MoCo v2's kNN top-1 is {rel} the raw-pixel kNN reference ({raw_knn:.1f} %, {delta:+.1f} points): "
            "its features separate the classes better than the pixels they were computed from."
            if delta > 0
            else f"MoCo v2's kNN top-1 is {rel} the raw-pixel kNN reference ({raw_knn:.1f} %, {delta:+.1f} points)."
        )
    spread = half_ranges(seeds)
    if not spread:
        lines.append("Detection was fine-tuned with one seed per row: no gap between rows is interpreted.")
        return lines
    counts = ", ".join(f"{ROW_TITLES[r]} {seed_count(v)}" for r, v in seeds.items())
    half = "; ".join(
        f"{ROW_TITLES[r]} "
        + ", ".join(f"{c} ±{v[c]:.1f} (sd {sample_sd(seeds[r][c]):.1f})" for c in DET_COLUMNS)
        for r, v in spread.items()
    )
    lines.append(
        f"Seed spread of detection (fine-tuning seeds per row: {counts}; half range and sample standard "
        f"deviation over seeds): {half}. A gap between two rows' means is read as real only when Welch's "
        "t-test finds it at 95 % confidence: it must exceed t · √(sd_a²/n_a + sd_b²/n_b), the ± shown with "
        "each gap below (a row with one seed is given the largest sd of its column)."
    )
    pairs = (
        ("moco_v2", "moco_v1"),
        ("moco_v1", "random_init"),
        ("moco_v2", "random_init"),
        ("moco_v2", "supervised"),
    )
    for col in DET_COLUMNS:
        parts = []
        for a, b in pairs:
            if a not in seeds or b not in seeds:
                continue
            gap, margin, verdict = _order_link(table, seeds, col, a, b)
            said = "beyond the seed spread" if verdict else "within the seed spread: not interpreted"
            parts.append(f"{ROW_TITLES[a]} − {ROW_TITLES[b]} {gap:+.1f} (spread ±{margin:.1f}, {said})")
        if parts:
            lines.append(f"{col}: " + "; ".join(parts) + ".")
    lines += [
        _ordering(table, seeds, col)
        for col in ("AP", "AP75")
        if all(r in seeds for r in ("moco_v2", "moco_v1", "random_init"))
    ]
    return lines


def _rank_section(ranks: dict | None, table: dict) -> list[str]:
    """The feature-rank table and what it says about transfer (nothing when the stage did not run)."""

    if not ranks:
        return []
    rows = ranks["rows"]
    any_row = next(iter(rows.values()))
    c4, c5 = any_row["res4"]["channels"], any_row["res5"]["channels"]
    md = [
        "### How many feature directions each backbone uses on the scenes",
        "",
        f"Effective rank (exp of the entropy of the normalised squared singular values) of the res4 and res5 "
        f"outputs over every position of {ranks['scenes']} test scenes ({ranks['size']}² centre crops, BN "
        f"with batch statistics as during fine-tuning); the maximum is the channel count ({c4} / {c5}).",
        "",
        f"| pretraining | res4 rank (of {c4}) | res5 rank (of {c5}) | AP50 |",
        "|---|---:|---:|---:|",
    ]
    for row, r in rows.items():
        md.append(
            f"| {ROW_TITLES[row]} | {r['res4']['effective_rank']:.1f} | {r['res5']['effective_rank']:.1f} | "
            f"{_fmt(table.get(row, {}).get('AP50'))} |"
        )
    md.append("")
    sup, v2 = rows.get("supervised"), rows.get("moco_v2")
    if sup and v2 and sup["res4"]["effective_rank"] < 0.25 * v2["res4"]["effective_rank"]:
        md += [
            f"The supervised backbone, trained to separate only 10 labels, spreads its res4 features over "
            f"{sup['res4']['effective_rank']:.1f} directions (res5: {sup['res5']['effective_rank']:.1f}) against "
            f"{v2['res4']['effective_rank']:.1f} for MoCo v2: a 10-way classifier needs few, and a detector that "
            "must also localise objects and reject background has little left to build on in a short "
            "fine-tuning. This is consistent with its low AP next to its high kNN / linear accuracy. ImageNet's "
            "1000 labels do not compress features this far, so the paper's supervised row is a strong detection "
            "baseline; this miniature's is not.",
            "",
        ]
    return md


# Long (154 lines): the report's sections in reading order, one markdown block each; splitting it would
# scatter the page a reader checks against the report top to bottom.
def _kept_comparisons(old_report: Path, new_md: list[str]) -> list[str]:
    """The "Reruns and machines" block of the previous report (``demo.compare --write-into``), kept when
    the results table it was measured against is unchanged; dropped otherwise, as it would be stale."""
    if not old_report.is_file():
        return []
    old = old_report.read_text()
    new = "\n".join(new_md)
    if BEGIN not in old or "<!-- /RESULTS -->" not in old or parse_table(old) != parse_table(new):
        return []
    return [BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END, ""]


def write_report(plan: Plan, stages: list[Stage], records: dict[str, dict], elapsed: float) -> Path:
    """Write ``plan.report_dir/report.md`` and its plots; returns the report's path."""
    import torch

    out_dir = plan.report_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    table = collect_table(plan)
    seeds = seed_values(plan)
    spread = half_ranges(seeds)
    raw = _load(plan.work / "raw_pixels" / "knn_results.json")
    raw_knn = raw["top1"] if raw else None
    manifest = _load(plan.data.manifest) or {}
    curves_png, ap_png, grid_png = (
        out_dir / "pretraining_curves.png",
        out_dir / "detection_ap.png",
        out_dir / "detections.png",
    )
    has_curves = _plot_curves(plan, curves_png, table["random_init"]["kNN top-1"])
    lincls_png = out_dir / "linear_probe_curves.png"
    has_lincls = _plot_lincls(plan, lincls_png)
    drawn = plan.work / "detections.png"
    if drawn.is_file() and drawn.resolve() != grid_png.resolve():
        shutil.copyfile(drawn, grid_png)
    _plot_ap(table, ap_png)
    total = wall_seconds(records)
    # The machine this work dir's numbers came from, for `python -m demo.compare` to label its runs.
    machine = f"{_machine_line()}, torch {torch.__version__}"
    atomic_write(plan.work / MACHINE_FILE, lambda f: f.write(f"{machine}\n".encode()), what="machine line")
    # ... and every number of the table with it, so a run elsewhere can be compared with this report.
    write_json_atomic({"machine": machine, "numbers": numbers(plan)}, out_dir / NUMBERS_FILE)

    md = [f"# MoCo v2 demo report ({plan.preset})", ""]
    md += [
        "The whole MoCo v2 protocol in miniature, on CPU: self-supervised pretraining, kNN and linear "
        "evaluation, conversion to Detectron2, Faster R-CNN C4 fine-tuning and VOC-style box AP. Every "
        "stage ran the project's real command-line entry point with a config from "
        f"`{Path(plan.config('x')).parent}/` (each inherits a full-scale config; its header states what it "
        "overrides and why: the scale, and MoCo v2's temperature).",
        "",
        f"- Data: Debian's `dataset-fashion-mnist` (real 28x28 product photos, 10 classes) -> "
        f"{manifest.get('counts', {}).get('imagefolder_train', '?')} train / "
        f"{manifest.get('counts', {}).get('imagefolder_val', '?')} val images (ImageFolder), "
        f"{manifest.get('counts', {}).get('voc_trainval_images', '?')} trainval / "
        f"{manifest.get('counts', {}).get('voc_test_images', '?')} test VOC-format scenes "
        f"({manifest.get('counts', {}).get('voc_test_boxes', '?')} test boxes; test scenes use test-split items only).",
        _backbone_line(plan.arch),
        f"- Seed {plan.seed} for the data and every stage. Machine: {_machine_line()}, torch {torch.__version__}, "
        f"no GPU. Independent stages ran {plan.jobs} at a time (the pretrainings, the evaluations, the "
        f"fine-tunings), each child with {side_by_side_threads(plan.threads, plan.jobs)} intra-op thread(s) (a MoCo "
        f"pretraining: {PRETRAIN_THREADS} + one loader worker), a stage running alone with {plan.threads}; all "
        "with `torch.use_deterministic_algorithms(True, warn_only=True)` (`demo/child.py`): the same command on "
        "the same machine gives the same numbers. Another CPU kernel set (e.g. AVX2 instead of AVX-512) rounds "
        "float32 differently and so moves the numbers; `python -m demo.compare RUN_A RUN_B` measures by how much.",
        f"- Total wall-clock of the stages: **{total / 60:.1f} min** (the time covered by the per-stage "
        "intervals below, stages side by side counted once, collected over a resumed demo's invocations; "
        f"the last invocation took {elapsed / 60:.1f} min).",
        "",
        "## Results",
        "",
        "Top-1 accuracies in % on the 10-class val split. kNN: weighted, k 200, T 0.07. Linear: "
        f"{_lincls_recipe(plan)} Box AP in % on the test scenes (VOC07 11-point AP; AP is the mean over "
        "IoU 0.50:0.95); rows fine-tuned with several seeds show mean ± half range.",
        "",
        "<!-- RESULTS -->",
        "| pretraining | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for row, vals in table.items():
        cells = [
            _fmt(vals[c]) + (f" ± {spread[row][c]:.1f}" if row in spread and c in DET_COLUMNS else "")
            for c in COLUMNS
        ]
        md.append(f"| {ROW_TITLES[row]} | " + " | ".join(cells) + " |")
    md += [
        "<!-- /RESULTS -->",
        "",
        f"Reference: weighted kNN (same k, T) on raw pixels: **{_fmt(raw_knn)} %** top-1.",
        "",
        "What the numbers say:",
        "",
        *[f"- {line}" for line in _findings(table, raw_knn, seeds)],
        "",
        *_kept_comparisons(out_dir / "report.md", md),
        "For shape only (not comparable in scale), the papers' numbers: ResNet-50, ImageNet-1M, 200 epochs; "
        "VOC07+12 R50-C4 24k iterations (MoCo v2 Table 2; random init from MoCo Table 2):",
        "",
        "| pretraining | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for row, vals in PAPER.items():
        md.append(f"| {ROW_TITLES[row]} | " + " | ".join(_fmt(v) for v in vals) + " |")
    md += ["", "## Pretraining curves", ""]
    md += [
        f"![pretraining curves]({curves_png.name})" if has_curves else "(no pretraining metrics found)",
        "",
    ]
    md += [
        "Loss and contrastive accuracy are per-epoch means of the logged training values (MoCo v1 uses "
        f"T {plan.temperature('moco_v1'):g}, MoCo v2 T {plan.temperature('moco_v2'):g}, so their losses are not "
        "on one scale); kNN, when the monitor ran (`KNN.EVAL_PERIOD`), is its top-1 after each evaluated epoch.",
        "",
    ]
    if has_lincls:
        md += [
            "## Linear classifier curves",
            "",
            f"![linear probe curves]({lincls_png.name})",
            "",
            "Val top-1 of each row's linear classifier after every epoch: flat before the last step of the "
            "schedule means the reported number is converged, not cut short.",
            "",
        ]
    md += [
        "## Detection",
        "",
        f"![AP per row]({ap_png.name})",
        "",
    ]
    if grid_png.is_file():
        md += [f"![test scenes]({grid_png.name})", ""]
    checks = [
        _load(plan.work / "detection" / f"transfer_check_{r}.json")
        for r in ("supervised", "moco_v1", "moco_v2")
    ]
    if all(checks):
        md += [
            "Weight transfer checked, not assumed: after building each detector with its converted weights, "
            f"all {checks[0]['tensors_identical']} pretrained tensors ({checks[0]['backbone_tensors']} backbone + "
            f"{checks[0]['res5_tensors']} res5) were compared with the source checkpoint and found identical "
            "(supervised, MoCo v1, MoCo v2).",
            "",
        ]
    md += _rank_section(_load(plan.work / "features" / "ranks.json"), table)
    md += ["## Stages: commands, configs, seeds, wall-clock", ""]
    md += [
        "Each stage's own wall-clock; stages that ran side by side (the pretrainings, the evaluations, the "
        "fine-tunings) overlap, so the times add up to more than the total above.",
        "",
        "| # | stage | time | result |",
        "|---:|---|---:|---|",
    ]
    for i, st in enumerate(stages, 1):
        rec = records.get(st.key, {})
        secs = fmt_seconds(rec["seconds"]) if "seconds" in rec else "–"
        md.append(f"| {i} | {st.title} | {secs} | {rec.get('summary', '') or ''} |")
    md += [
        "",
        "Exact commands (run from the repository root; `python` is the project's `.venv/bin/python`):",
        "",
        "```",
    ]
    for st in stages:
        md.append(records.get(st.key, {}).get("command") or st.command_line())
    md += ["```", "", "Configs (each inherits a full-scale config through `_BASE_`):", ""]
    config_dir = Path(plan.config("x")).parent
    for f in sorted(config_dir.glob("*.yaml")):
        md += [
            f"<details><summary><code>{f}</code></summary>",
            "",
            "```yaml",
            f.read_text().rstrip(),
            "```",
            "</details>",
            "",
        ]
    md += [f"_Generated {time.strftime('%Y-%m-%d %H:%M')} by `python -m demo.run`._", ""]
    report = out_dir / "report.md"
    atomic_write(report, lambda f: f.write("\n".join(md).encode()), what="report")
    return report
