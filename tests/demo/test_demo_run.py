"""End to end: the smallest demo variant runs every stage and reports finite numbers for every row.

One run of ``python -m demo.run --preset smoke`` (the same stages and entry points as ``make demo``,
at the smallest scale), then a resumed run after deleting two stages' outputs: only those rerun, and
they reproduce their numbers exactly (same seed, same machine -> same numbers).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from demo.fashion_mnist import DEFAULT_DIR, SPLIT_FILES
from demo.report import parse_table
from moco_d2.core.backbone import ARCHS

ROOT = Path(__file__).resolve().parents[2]
HAVE_DATA = all((DEFAULT_DIR / f).is_file() for pair in SPLIT_FILES.values() for f in pair)


def _run(work: Path, data: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "demo.run",
        "--preset",
        "smoke",
        "--work",
        str(work),
        "--data-root",
        str(data),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)


@pytest.mark.skipif(not HAVE_DATA, reason="Debian package dataset-fashion-mnist is not installed")
def test_smoke_demo_end_to_end_and_resume(tmp_path):
    work, data = tmp_path / "work", tmp_path / "data"
    first = _run(work, data)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = (work / "report.md").read_text()
    table = parse_table(report)
    assert list(table) == ["random init", "supervised", "MoCo v1", "MoCo v2"]
    for row, cells in table.items():
        assert len(cells) == 5, row
        assert all(math.isfinite(float(c.split(" ± ")[0])) for c in cells), (row, cells)
        # detection of random init and MoCo v2 ran with two seeds: mean ± half range
        assert all((" ± " in c) == (row in ("random init", "MoCo v2")) for c in cells[2:]), (row, cells)
    assert (work / "detection" / "moco_v2_seed1" / "metrics.json").is_file()
    assert "Seed spread of detection" in report
    # the curves' caption reads each MoCo row's temperature from its config (v2's departs from 0.2)
    assert "MoCo v1 uses T 0.07, MoCo v2 T 0.1, so their losses" in report
    lincls = json.loads((work / "lincls" / "moco_v2" / "results.json").read_text())
    assert lincls["features"].startswith("precomputed once") and lincls["sanity_check"] == "passed"
    # each row's images went through its backbone once: the kNN stage extracted, the linear probe read
    assert "train features" in (work / "logs" / "knn.moco_v2.log").read_text()
    assert "train features" not in (work / "logs" / "lincls.moco_v2.log").read_text()
    for png in ("pretraining_curves.png", "detection_ap.png", "detections.png", "linear_probe_curves.png"):
        assert (work / png).stat().st_size > 0
    checks = [json.loads((work / "detection" / f"transfer_check_{r}.json").read_text()) for r in ("moco_v2",)]
    assert checks[0]["tensors_identical"] == 100  # ResNet-18 layout: 75 backbone + 25 res5 tensors
    assert "100 tensors identical" in first.stdout
    ranks = json.loads((work / "features" / "ranks.json").read_text())["rows"]
    assert list(ranks) == ["random_init", "supervised", "moco_v1", "moco_v2"]
    for r in ranks.values():
        assert (
            1.0
            <= r["res4"]["effective_rank"]
            <= r["res4"]["channels"]
            == ARCHS["resnet18_small"].stage_channels[2]
        )
    assert "How many feature directions" in report

    # Resume: delete two finished stages' outputs; only they run again, with identical numbers.
    knn_json = work / "knn" / "moco_v2" / "knn_results.json"
    lin_json = work / "lincls" / "random_init" / "results.json"
    before = json.loads(knn_json.read_text())["top1"], json.loads(lin_json.read_text())["top1"]
    knn_json.unlink()
    shutil.rmtree(lin_json.parent)
    second = _run(work, data)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    reran = [line for line in second.stdout.splitlines() if line.startswith("✓")]
    assert len(reran) == 3, reran  # the two deleted stages and the report
    after = json.loads(knn_json.read_text())["top1"], json.loads(lin_json.read_text())["top1"]
    assert after == before
    assert parse_table((work / "report.md").read_text()) == table
    # numbers.json, written with the report, holds the work dir's numbers exactly (JSON floats round-trip)
    from demo.compare import main as compare_main

    assert compare_main([str(work / "numbers.json"), str(work), "--preset", "smoke"]) == 0


def test_missing_stage_output_is_a_clear_error(tmp_path):
    """A child that fails stops the demo with one line naming the stage and its log."""
    from demo.stages import Runner, Stage, StageFailed

    runner = Runner(tmp_path, total=1, log=lambda *_: None)
    stage = Stage(
        "x", "failing stage", tmp_path / "never", argv=[sys.executable, "-c", "raise SystemExit(3)"]
    )
    with pytest.raises(StageFailed, match=r"failing stage.*exit code 3.*x\.log"):
        runner.run(stage)


def test_children_run_with_pinned_threads_and_deterministic_algorithms(tmp_path):
    """demo.child: the stage's script sees the thread count and deterministic algorithms, and its argv."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torch\n"
        "print(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),\n"
        "      torch.is_deterministic_algorithms_warn_only_enabled(), sys.argv[1:])\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "demo.child", "1", str(script), "a", "b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "1 True True ['a', 'b']"


def test_wall_seconds_counts_side_by_side_stages_once():
    from demo.stages import wall_seconds

    records = {
        "a": {"seconds": 10.0, "start": 100.0, "end": 110.0},
        "b": {"seconds": 8.0, "start": 104.0, "end": 112.0},  # overlaps a: adds 2
        "c": {"seconds": 1.0, "start": 111.0, "end": 112.0},  # inside b: adds 0
        "d": {"seconds": 5.0, "start": 200.0, "end": 205.0},  # a later invocation: the pause is not counted
        "old": {"seconds": 3.0},  # a record from before the intervals were kept
    }
    assert wall_seconds(records) == 10.0 + 2.0 + 5.0 + 3.0


def _rendezvous(tmp_path: Path, me: str, other: str) -> list[str]:
    """A child that writes its flag, then waits up to 60 s for the other's: it succeeds only if the two
    run at the same time, and writes its intra-op thread count as its output."""
    code = (
        "import pathlib, sys, time, torch\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "(d / (sys.argv[2] + '.flag')).touch()\n"
        "deadline = time.time() + 60\n"
        "while not (d / (sys.argv[3] + '.flag')).exists():\n"
        "    if time.time() > deadline:\n"
        "        raise SystemExit('alone')\n"
        "    time.sleep(0.05)\n"
        "(d / (sys.argv[2] + '.out')).write_text(str(torch.get_num_threads()))\n"
    )
    return [sys.executable, "-c", code, str(tmp_path), me, other]


def test_a_concurrent_group_runs_its_children_side_by_side_with_shared_threads(tmp_path):
    from demo.stages import Runner, Stage

    runner = Runner(tmp_path, total=3, log=lambda *_: None, threads=2, jobs=2)
    stages = [
        Stage(n, f"stage {n}", tmp_path / f"{n}.out", argv=_rendezvous(tmp_path, n, o), concurrent="g")
        for n, o in (("a", "b"), ("b", "a"))
    ]
    stages.append(Stage("c", "stage c", tmp_path / "c.out", argv=[sys.executable, "-c", "import pathlib, sys, torch; pathlib.Path(sys.argv[1]).write_text(str(torch.get_num_threads()))", str(tmp_path / "c.out")]))  # fmt: skip
    runner.run_all(stages)
    # a and b met (each waited for the other), each with 2 // 2 threads; c ran alone with all 2
    assert [(tmp_path / f"{n}.out").read_text() for n in "abc"] == ["1", "1", "2"]
    assert [runner.records[n]["threads"] for n in "abc"] == [1, 1, 2]


def test_a_failing_child_stops_its_siblings(tmp_path):
    import os

    from demo.stages import Runner, Stage, StageFailed

    runner = Runner(tmp_path, total=2, log=lambda *_: None, jobs=2)
    pid_file = tmp_path / "sleeper.pid"
    sleeper = [sys.executable, "-c", "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)", str(pid_file)]  # fmt: skip
    failing = [sys.executable, "-c", "import pathlib, sys, time\nwhile not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.05)\nraise SystemExit(4)", str(pid_file)]  # fmt: skip
    stages = [
        Stage("sleeper", "sleeping stage", tmp_path / "never1", argv=sleeper, concurrent="g"),
        Stage("failing", "failing stage", tmp_path / "never2", argv=failing, concurrent="g"),
    ]
    with pytest.raises(StageFailed, match=r"failing stage.*exit code 4.*failing\.log"):
        runner.run_all(stages)
    with pytest.raises(ProcessLookupError):  # stopped and reaped, not left running for 600 s
        os.kill(int(pid_file.read_text()), 0)


def test_a_stage_waits_for_the_stage_it_reads_from(tmp_path):
    from demo.stages import Runner, Stage

    def writer(name: str, delay: float) -> list[str]:
        code = "import pathlib, sys, time; time.sleep(float(sys.argv[2])); pathlib.Path(sys.argv[1]).touch()"
        return [sys.executable, "-c", code, str(tmp_path / f"{name}.out"), str(delay)]

    # b reads a's output (fails if it is missing); with two slots, a and c start first and b waits for a
    reader = [sys.executable, "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1]); assert p.with_name('a.out').exists(); p.touch()", str(tmp_path / "b.out")]  # fmt: skip
    stages = [
        Stage("a", "stage a", tmp_path / "a.out", argv=writer("a", 1.0), concurrent="g"),
        Stage("b", "stage b", tmp_path / "b.out", argv=reader, concurrent="g", after="a"),
        Stage("c", "stage c", tmp_path / "c.out", argv=writer("c", 0.0), concurrent="g"),
    ]
    runner = Runner(tmp_path, total=3, log=lambda *_: None, jobs=2)
    runner.run_all(stages)
    rec = runner.records
    assert rec["b"]["start"] >= rec["a"]["end"] and rec["c"]["start"] < rec["a"]["end"]


def test_knn_and_linear_configs_agree_on_what_their_shared_features_depend_on():
    """Every preset's kNN and linear-probe configs give one checkpoint the same feature-cache key, so the
    linear stage reads the kNN stage's features instead of extracting them again."""
    from demo.plan import CONFIG_DIRS
    from moco_d2.core.config import load_config
    from moco_d2.evaluation.features import feature_cache_key
    from moco_d2.evaluation.knn import knn_defaults
    from moco_d2.evaluation.lincls import lincls_defaults

    ckpt = Path(__file__)  # any file: the key hashes its bytes
    for preset, configs in CONFIG_DIRS.items():
        knn = load_config(knn_defaults(), str(configs / "knn.yaml"))
        lin = load_config(lincls_defaults(), str(configs / "lincls.yaml"))
        assert lin.TRAIN.PRECOMPUTED_FEATURES, preset
        keys = [feature_cache_key(str(ckpt), c.DATA, c.TRAIN.AMP) for c in (knn, lin)]
        assert keys[0] == keys[1], preset
