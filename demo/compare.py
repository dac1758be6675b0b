"""Compare the numbers of two demo runs: is a rerun identical, and how far does another machine land?

    python -m demo.compare RUN_A RUN_B [--preset full] [--write-into results/demo/report.md]

A run is a demo work dir (``results/demo/work/full``) or the ``numbers.json`` a report was written with
(``results/demo/numbers.json``, committed with the report), so a run on any machine can be held against
the committed report without its work dir. Prints every table cell (kNN, linear, each detection seed's
AP50/AP/AP75, the raw-pixel reference) that both runs have, and each row's detection mean over those
seeds, with their difference, then one JSON line with the largest difference per column. Exit status
0 when both runs have the same numbers, all identical; 1 otherwise, so scripts can assert
reproducibility. ``--write-into`` records the comparison as one row of the report's "Reruns and
machines" table (both runs' machine lines); ``demo.run`` keeps that table while the results it was
measured against stay the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from demo import data as demo_data
from demo.plan import MACHINE_FILE, NUMBERS_FILE, ROW_TITLES, ROWS, Plan
from moco_d2.core.errors import UserError, exit_on_user_error
from moco_d2.core.io import atomic_write

DETECTION = ("AP50", "AP", "AP75")
MEANS = tuple(f"mean {col}" for col in DETECTION)  # a row's mean over its seeds: what the findings compare
KINDS = ("kNN top-1", "linear top-1", *DETECTION, *MEANS)
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


def _split(key: str) -> tuple[str, str]:
    """ "<row> / <column> (seed s)" -> (row, column)."""
    title, cell = key.split(" / ")
    return title, cell.split(" (")[0]


def with_means(nums: dict[str, float | None]) -> dict[str, float | None]:
    """``nums`` plus each row's mean over its detection seeds, keyed "<row> / mean <column>"."""
    seeds: dict[str, list[float | None]] = {}
    for key, value in nums.items():
        title, col = _split(key)
        if col in DETECTION:
            seeds.setdefault(f"{title} / mean {col}", []).append(value)
    means = {k: None if None in v else sum(v) / len(v) for k, v in seeds.items()}  # type: ignore[arg-type]
    return {**nums, **means}


def compare(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float]:
    """Largest |a - b| per column kind (kNN, linear, AP50, AP, AP75, and the rows' detection means);
    NaN where a number is missing."""
    worst: dict[str, float] = {}
    for key in a:
        kind = _split(key)[1]
        va, vb = a[key], b.get(key)
        diff = float("nan") if va is None or vb is None else abs(va - vb)
        worst[kind] = max(worst.get(kind, 0.0), diff) if diff == diff else float("nan")
    return worst


def load_run(path: Path, preset: str, seed: int) -> tuple[str, dict[str, float | None]]:
    """(machine line, numbers) of a run: a ``numbers.json`` file, or a work dir read stage by stage."""
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            return saved["machine"], saved["numbers"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{path}: expected a demo {NUMBERS_FILE} with 'machine' and 'numbers' ({e!r})"
            ) from None
    if not path.is_dir():
        raise UserError(f"{path}: no such demo work dir or {NUMBERS_FILE}")
    plan = Plan(preset, seed, demo_data.DemoData(Path(".")), path, path)
    return machine(path), numbers(plan)


def machine(work: Path) -> str:
    """The machine line a work dir's report recorded (CPU, kernel set, torch), or its path if none."""
    path = work / MACHINE_FILE
    return path.read_text().strip() if path.is_file() else f"(no {MACHINE_FILE} in {work})"


def block(rows: list[str]) -> list[str]:
    """The report's comparison section around its table rows (one row per pair of machines)."""
    return [
        BEGIN,
        "### Reruns and machines",
        "",
        "Each row compares every number of the table above between two complete runs of `make demo` with "
        "`python -m demo.compare RUN_A RUN_B`: the largest |B − A| in points, per number (detection per "
        "seed) and per row mean over the seeds (what the findings compare). A rerun on the same machine must "
        "give 0 everywhere. Another CPU or kernel set rounds float32 differently; a fine-tuning's rounding "
        "differences grow like a change of seed, so its per-seed numbers move by about the seed spread and "
        "its row means by less. A gap between rows is interpreted only when it exceeds both the Welch "
        "margin above and the row-mean differences here.",
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


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compare the numbers of two demo runs.")
    p.add_argument("work_a", type=Path)
    p.add_argument("work_b", type=Path)
    p.add_argument("--preset", default="full", choices=sorted(demo_data.PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-into", type=Path, help="report.md to record this comparison in")
    args = p.parse_args(argv)
    (machine_a, nums_a), (machine_b, nums_b) = (
        load_run(path, args.preset, args.seed) for path in (args.work_a, args.work_b)
    )
    # Only the numbers both runs have (e.g. a run with more fine-tuning seeds): the means stay like for like.
    shared = [k for k in nums_a if k in nums_b]
    only = {"A": len(nums_a) - len(shared), "B": len(nums_b) - len(shared)}
    runs = [with_means({k: nums[k] for k in shared}) for nums in (nums_a, nums_b)]
    print(f"{len(shared)} numbers in both runs; only in A: {only['A']}, only in B: {only['B']}")
    print(f"{'number':<34} {'A':>8} {'B':>8} {'B - A':>8}")
    for key, va in runs[0].items():
        vb = runs[1].get(key)
        diff = "–" if va is None or vb is None else f"{vb - va:+.2f}"
        fa = "–" if va is None else f"{va:.2f}"
        fb = "–" if vb is None else f"{vb:.2f}"
        print(f"{key:<34} {fa:>8} {fb:>8} {diff:>8}")
    worst = compare(*runs)
    identical = runs[0] == runs[1] and None not in runs[0].values() and not any(only.values())
    print(json.dumps({"demo_compare": {"identical": identical, "only_in": only, "max_abs_diff": worst}}))
    if args.write_into:
        key = f"| {machine_a} | {machine_b} |"
        cells = [f"{worst[k]:.2f}" if k in worst else "–" for k in KINDS]
        write_into(
            args.write_into, key, f"{key} {'yes' if identical else 'no'} | " + " | ".join(cells) + " |"
        )
        print(f"recorded in {args.write_into}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
