"""bench/bench_issue18.py cannot rot before its one GPU call: the same script, tiny, on the CPU.

ResNet-18 at 32 px, one step per round; the compiled row uses dynamo's ``eager`` backend (the row's wiring,
without inductor's minutes of code generation). Checks that every row is printed next to the official
step, that the ratios and projected hours follow from the printed rates, and that the CUDA-graph check
says "n/a" off CUDA.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rounding import ratio_within_rounding

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--K", "64", "--batch", "32",
    "--split-batch", "16", "--splits", "8", "--steps", "1", "--rounds", "3", "--warmup", "1",
    "--compile-backend", "eager", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def run() -> tuple[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_issue18", *ARGS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard: ~15 s on a quiet machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # tables, then exactly one JSON line
    return proc.stdout, json.loads(lines[0])


def test_every_row_is_printed_next_to_the_official_step(run):
    stdout, out = run
    assert out["bench"] == "issue18" and sorted(out["results"]) == ["b32", "split8"]
    b32, split8 = out["results"]["b32"], out["results"]["split8"]
    assert [r["mode"] for r in b32] == [
        out["official"],
        "ours: fp32 + foreach SGD",
        "ours: fp32 + foreach SGD + compile (backend eager)",
    ]
    assert [(r["batch"], r["bn_splits"]) for r in b32] == [(32, 1)] * 3
    assert [(r["batch"], r["bn_splits"]) for r in split8] == [(16, 8)] * 2
    assert split8[0]["mode"].startswith("official") and "vectorised split BN" in split8[1]["mode"]
    for key, rows in out["results"].items():
        official = rows[0]["images_per_s"][0]
        for r in rows:
            med, lo, hi = r["images_per_s"]
            assert 0 < lo <= med <= hi
            assert ratio_within_rounding(r["ratio_vs_official"], med, official, ratio_decimals=3)
            # the table row: the same rates and the ratio to 2 decimals
            pattern = rf"^\s*{key}\s+{r['batch']}\s+{r['bn_splits']}\s+{re.escape(r['mode'])}\s+"
            pattern += rf"{med:.1f} \({lo:.1f}-{hi:.1f}\)\s+(\d+\.\d\d)x"
            printed = re.search(pattern, stdout, re.MULTILINE)
            assert printed, (pattern, stdout)
            assert ratio_within_rounding(float(printed.group(1)), med, official)
    # plain BN, same weights and inputs: the shuffle permutation cannot change the first loss
    assert b32[1]["first_loss"] == pytest.approx(b32[0]["first_loss"], abs=1e-3)
    assert b32[2]["first_loss"] == pytest.approx(b32[1]["first_loss"], abs=1e-4)


def test_cuda_graph_check_says_na_off_cuda(run):
    stdout, out = run
    assert out["cuda_graphs"]["used"] == "n/a" and out["cuda_graphs"]["mode"].endswith("(backend eager)")
    assert "CUDA graphs in 'ours: fp32 + foreach SGD + compile (backend eager)': n/a (cpu)" in stdout


def test_projection_is_labelled_and_follows_from_the_measured_rates(run):
    stdout, out = run
    assert "PROJECTION, not a measurement" in stdout and "PROJECTION" in out["projection_200ep"]["note"]
    rows = out["projection_200ep"]["rows"]
    measured = {(k, r["mode"]): r["images_per_s"][0] for k, rs in out["results"].items() for r in rs}
    assert [(r["gpus"], r["mode"]) for r in rows] == [
        *((1, r["mode"]) for r in out["results"]["split8"]),
        *((8, r["mode"]) for r in out["results"]["b32"]),
    ]
    for r in rows:
        rate = measured[("split8" if r["gpus"] == 1 else "b32", r["mode"])]
        assert r["images_per_s_per_gpu"] == rate
        # hours = (200 epochs x 1,281,167 images / 3600) / (gpus x rate): a ratio of an exact number to the
        # rate printed to 0.1, itself printed to 0.01
        assert ratio_within_rounding(r["hours"], 200 * 1_281_167 / 3600 / r["gpus"], rate)


def test_fewer_than_three_rounds_is_refused():
    from bench.bench_issue18 import main

    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--rounds", "2"])


@pytest.mark.parametrize(
    ("launches", "recorded", "skips", "verdict"),
    [
        ({"graph_launches": 3, "kernel_launches": 40}, 3, 0, "yes"),
        ({"graph_launches": 2, "kernel_launches": 400}, 2, 1, "partly"),  # e.g. one graph fell back
        ({"graph_launches": 0, "kernel_launches": 900}, 0, 2, "no"),
        (None, 3, 0, "yes"),  # profiler unavailable: the recorded graphs decide
        (None, None, 0, "unknown"),
    ],
)
def test_cuda_graph_verdict_and_line(launches, recorded, skips, verdict):
    """The GPU run's report, from the evidence it collects (no GPU here: the evidence is made up)."""
    from bench.bench_issue18 import cudagraph_verdict, describe_cudagraphs

    report = {
        "mode": "ours + compile reduce-overhead",
        "device": "cuda",
        "graphs_after_warmup": recorded,
        "graphs_after_timing": recorded,
        "launches_in_one_step": launches,
        "counters_delta": {"cudagraph_skips": skips} if skips else {},
        "skip_reasons": ["skipping cudagraphs due to mutated inputs (2 instances)"] if skips else [],
    }
    report["used"] = cudagraph_verdict(report)
    assert report["used"] == verdict
    line = describe_cudagraphs(report)
    assert line.startswith(f"CUDA graphs in 'ours + compile reduce-overhead': {verdict} -- ")
    assert f"inductor cudagraph skips: {skips}" in line
    assert ("skip reason: skipping cudagraphs due to mutated inputs" in line) == bool(skips)
