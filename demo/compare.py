"""Compare the numbers of two demo runs: is a rerun identical, and how far does another machine land?

    python -m demo.compare results/demo/work/full /tmp/clone/results/demo/work/full [--preset full]
        [--write-into results/demo/report.md]

Prints every table cell (kNN, linear, each detection seed's AP50/AP/AP75, the raw-pixel reference)
of both runs with their difference, then one JSON line with the largest difference per column.
Exit status 0 when every number is identical, 1 otherwise, so scripts can assert reproducibility.
``--write-into`` records the comparison as one row of the report's "Reruns and kernel sets" table
(both runs' machines, taken from their work dirs); ``demo.run`` keeps that table while the results
it was measured against stay the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from demo import data as demo_data
from demo.plan import MACHINE_FILE, ROW_TITLES, ROWS, Plan
from moco_d2.core.io import atomic_write

DETECTION = ("AP50", "AP", "AP75")
KINDS = ("kNN top-1", "linear top-1", *DETECTION)
# The block of the report that holds the comparisons, between these markers.
BEGIN, END = "<!-- COMPARE -->", "<!-- /COMPARE -->"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def numbers(plan: Plan) -> dict[str, float | None]:
    """Every number the report is made of, keyed "<row> / <column>" (detection per seed)."""
    w = plan.work
    out: dict[str, float | None] = {
        "raw pixels / kNN top-1": _load(w / "raw_pixels" / "knn_results.json").get("top1")
    }
    for row in ROWS:
        title = ROW_TITLES[row]
        out[f"{title} / kNN top-1"] = _load(w / "knn" / row / "knn_results.json").get("top1")
        out[f"{title} / linear top-1"] = _load(w / "lincls" / row / "results.json").get("top1")
        for seed in plan.detection_seeds(row):
            det = _load(plan.detection_dir(row, seed) / "metrics.json")
            for col in DETECTION:
                out[f"{title} / {col} (seed {seed})"] = det.get(col)
    return out


def compare(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float]:
    """Largest |a - b| per column kind (kNN, linear, AP50, AP, AP75); NaN where a number is missing."""
    worst: dict[str, float] = {}
    for key in a:
        kind = key.split(" / ")[1].split(" (")[0]
        va, vb = a[key], b.get(key)
        diff = float("nan") if va is None or vb is None else abs(va - vb)
        worst[kind] = max(worst.get(kind, 0.0), diff) if diff == diff else float("nan")
    return worst


def machine(work: Path) -> str:
    """The machine line a work dir's report recorded (CPU, kernel set, torch), or its path if none."""
    path = work / MACHINE_FILE
    return path.read_text().strip() if path.is_file() else f"(no {MACHINE_FILE} in {work})"


def block(rows: list[str]) -> list[str]:
    """The report's comparison section around its table rows (one row per pair of machines)."""
    return [
        BEGIN,
        "### Reruns and kernel sets",
        "",
        "Each row compares every number of the table above (detection per seed) between two complete runs of "
        "`make demo` with `python -m demo.compare RUN_A RUN_B`: the largest |B − A| per column, in points. "
        "A rerun on the same machine must give 0 everywhere; another CPU kernel set rounds float32 "
        "differently, and its differences are read like the seed spread: a gap between rows smaller than "
        "them is not interpreted.",
        "",
        "| run A | run B | identical | " + " | ".join(KINDS) + " |",
        "|---|---|---|" + "---:|" * len(KINDS),
        *rows,
        END,
    ]


def write_into(report: Path, row_key: str, row: str) -> None:
    """Add ``row`` to the report's comparison table, replacing the row with the same ``row_key``."""
    text = report.read_text()
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        old, tail = rest.split(END, 1)
        rows = [r for r in old.splitlines() if r.startswith("| ") and not r.startswith("| run A")]
    else:
        marker = "## Pretraining curves"
        head, tail = text.split(marker, 1) if marker in text else (text + "\n", "")
        tail = "\n\n" + marker + tail if marker in text else ""
        rows = []
    rows = [r for r in rows if not r.startswith(row_key)] + [row]
    new = head + "\n".join(block(rows)) + tail
    atomic_write(report, lambda f: f.write(new.encode()), what="report")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compare the numbers of two demo runs.")
    p.add_argument("work_a", type=Path)
    p.add_argument("work_b", type=Path)
    p.add_argument("--preset", default="full", choices=sorted(demo_data.PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-into", type=Path, help="report.md to record this comparison in")
    args = p.parse_args(argv)
    runs = [
        numbers(Plan(args.preset, args.seed, demo_data.DemoData(Path(".")), work, work))
        for work in (args.work_a, args.work_b)
    ]
    print(f"{'number':<34} {'A':>8} {'B':>8} {'B - A':>8}")
    for key, va in runs[0].items():
        vb = runs[1].get(key)
        diff = "–" if va is None or vb is None else f"{vb - va:+.2f}"
        fa = "–" if va is None else f"{va:.2f}"
        fb = "–" if vb is None else f"{vb:.2f}"
        print(f"{key:<34} {fa:>8} {fb:>8} {diff:>8}")
    worst = compare(*runs)
    identical = runs[0] == runs[1] and None not in runs[0].values()
    print(json.dumps({"demo_compare": {"identical": identical, "max_abs_diff": worst}}))
    if args.write_into:
        key = f"| {machine(args.work_a)} | {machine(args.work_b)} |"
        cells = [f"{worst[k]:.2f}" if k in worst else "–" for k in KINDS]
        write_into(
            args.write_into, key, f"{key} {'yes' if identical else 'no'} | " + " | ".join(cells) + " |"
        )
        print(f"recorded in {args.write_into}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
