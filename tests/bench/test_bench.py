"""The benchmarks run (as `make bench` calls them) and report every row against a same-run baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rounding import ratio_within_rounding

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # a table, then exactly one JSON line
    return json.loads(lines[0])


@pytest.mark.usefixtures("one_thread")
def test_loader_bench_rows_and_wait_fractions():
    out = run_bench(
        "bench.bench_loader", "--workers", "0", "--batch", "4", "--steps", "2", "--size", "32",
        "--step-ms", "5", "--unique-images", "8",
    )  # fmt: skip
    assert out["bench"] == "loader" and [r["impl"] for r in out["results"]] == ["reference", "fast", "gpu"]
    for r in out["results"]:
        assert r["images_per_s"] > 0 and 0.0 <= r["wait_fraction"] <= 1.0


def test_loader_bench_real_step_on_cpu_uses_host_normalisation_row():
    out = run_bench(
        "bench.bench_loader", "--real-step", "resnet18", "--device", "cpu", "--workers", "0", "--batch", "4",
        "--steps", "1", "--size", "32", "--impls", "reference", "fast-hostnorm", "fast", "--unique-images", "8",
    )  # fmt: skip
    assert [r["impl"] for r in out["results"]] == ["reference", "fast-hostnorm", "fast"]
    assert out["real_step"] == "resnet18" and all(r["images_per_s"] > 0 for r in out["results"])


def test_augment_bench_reports_ratio_to_reference():
    out = run_bench(
        "bench.bench_augment", "--images", "4", "--rounds", "1", "--size", "32", "--demo-images", "4"
    )
    assert out["bench"] == "augment"
    rates = out["images_per_s_per_core"]
    for name in ("mocov2", "mocov1"):
        printed = out[f"ratio_fast_vs_reference_{name}"]
        assert ratio_within_rounding(printed, rates[f"fast_{name}"], rates[f"reference_{name}"])
    demo = out["demo_28px"]  # the demo's scale: 28² views of 28² PNGs
    assert demo["size"] == 28 and demo["images"] == 4
    rates = demo["images_per_s_per_core"]
    assert ratio_within_rounding(
        demo["ratio_fast_vs_reference_mocov2"], rates["fast_mocov2"], rates["reference_mocov2"]
    )


def test_step_bench_compares_official_and_trainer_step_per_bn():
    out = run_bench(
        "bench.bench_step", "--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--batch-sizes", "16",
        "--K", "64", "--bn-splits", "1", "8", "--steps", "1", "--rounds", "1", "--warmup", "1",
    )  # fmt: skip
    assert [r["bn_splits"] for r in out["results"]] == [1, 8]
    assert out["official"].startswith("official") and out["ours"].startswith("ours: fp32 + foreach SGD")
    plain = out["results"][0]
    # same weights and inputs; with plain BN the shuffle permutation does not change the result
    assert plain["ours_first_loss"] == pytest.approx(plain["official_first_loss"], abs=1e-3)
