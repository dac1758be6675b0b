"""Demo report pieces: per-epoch curves, honest findings, progress parsing, weight-name mapping."""

from __future__ import annotations

import json
import math

import pytest
import torch

from demo.compare import BEGIN, END
from demo.diagnostics import effective_rank
from demo.report import _findings, _kept_comparisons, _rank_section, pretrain_curves
from demo.stages import detectron2_progress, epoch_progress, probe_progress, two_pass_progress
from demo.transfer import detectron2_name, is_pretrainable


def test_pretrain_curves_average_per_epoch(tmp_path):
    lines = [
        {"step": 2, "train/loss": 8.0, "train/acc1": 10.0, "train/epoch": 0.5},
        {"step": 4, "train/loss": 6.0, "train/acc1": 20.0, "train/epoch": 1.0},
        {"step": 4, "knn/top1": 70.0, "knn/top5": 99.0},
        {"step": 6, "train/loss": 5.0, "train/acc1": 40.0, "train/epoch": 1.5},
        {"step": 8, "train/loss": 3.0, "train/acc1": 60.0, "train/epoch": 2.0},
        {"step": 8, "knn/top1": 75.5, "knn/top5": 99.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    c = pretrain_curves(path)
    assert c["epoch"] == [1, 2] and c["loss"] == [7.0, 4.0] and c["acc1"] == [15.0, 50.0]
    assert c["knn"] == [70.0, 75.5]


def _table(v2: float, others: dict[str, float]) -> dict:
    cols = ("kNN top-1", "linear top-1", "AP50", "AP", "AP75")
    rows = {"moco_v2": v2, **others}
    return {r: dict.fromkeys(cols, v) for r, v in rows.items()}


def test_findings_say_when_a_baseline_wins():
    table = _table(70.0, {"random_init": 72.04, "supervised": 90.0, "moco_v1": 60.0})
    lines = _findings(table, raw_knn=80.0, seeds={})
    assert any("did NOT beat random init by the kNN measure" in s for s in lines)
    assert any("below the raw-pixel" in s and "-10.0 points" in s for s in lines)
    assert "Detection was fine-tuned with one seed per row: no gap between rows is interpreted." in lines


def _seeds(per_row: dict[str, list[float]]) -> dict:
    return {r: dict.fromkeys(("AP50", "AP", "AP75"), v) for r, v in per_row.items()}


def test_findings_read_detection_gaps_against_the_seed_spread():
    table = _table(50.0, {"random_init": 40.0, "supervised": 49.0, "moco_v1": 48.0})
    # sample sds: moco_v2 [49, 51] -> sqrt(2), random_init [40, 40] -> 0; the one-seed rows (MoCo v1,
    # supervised) are given the column's largest, sqrt(2)
    seeds = _seeds(
        {"moco_v2": [49.0, 51.0], "random_init": [40.0, 40.0], "moco_v1": [48.0], "supervised": [49.0]}
    )
    lines = _findings(table, raw_knn=45.0, seeds=seeds)
    ap = next(s for s in lines if s.startswith("AP: "))
    # against a row without noise Welch's df is the noisy row's n - 1 (1 here; a one-seed row counts 1):
    # MoCo v1: t(0.975, 1) * sqrt(2 / 1) = 12.7062 * 1.4142 = 17.97; MoCo v2: 12.7062 * sqrt(2 / 2)
    assert "MoCo v1 − random init +8.0 (spread ±18.0, within the seed spread: not interpreted)" in ap
    assert "MoCo v2 − random init +10.0 (spread ±12.7, within the seed spread: not interpreted)" in ap
    assert any("above the raw-pixel" in s and "+5.0 points" in s for s in lines)
    # more seeds, less noise: four per row, sd 1 each -> margin t(0.975, 6) * sqrt(1/4 + 1/4) = 1.730
    seeds = _seeds(
        {
            r: [m - 1.5 + x for x in (0.0, 1.0, 2.0, 3.0)]
            for r, m in (("moco_v2", 50), ("moco_v1", 48), ("random_init", 40))
        }
    )  # [m-1.5, m-.5, m+.5, m+1.5]: sd sqrt(5/3)
    lines = _findings(table, raw_knn=None, seeds=seeds)
    assert (
        "The paper's ordering MoCo v2 ≥ MoCo v1 > random init on AP: MoCo v1 > random init beyond the spread "
        "(+8.0, ±2.2); MoCo v2 > MoCo v1 beyond the spread (+2.0, ±2.2)." not in lines
    )  # sqrt(5/3) * sqrt(1/2) * 2.4469 = 2.234: +2.0 is a tie
    assert (
        "The paper's ordering MoCo v2 ≥ MoCo v1 > random init on AP: MoCo v1 > random init beyond the spread "
        "(+8.0, ±2.2); MoCo v2 − MoCo v1 +2.0 is within the spread (±2.2): a tie, which does not contradict "
        "v2 ≥ v1 but does not show v2 ahead either." in lines
    )
    table["moco_v2"]["AP75"] = 52.5
    lines = _findings(table, raw_knn=None, seeds=seeds)
    assert (
        "The paper's ordering MoCo v2 ≥ MoCo v1 > random init on AP75: MoCo v1 > random init beyond the spread "
        "(+8.0, ±2.2); MoCo v2 > MoCo v1 beyond the spread (+4.5, ±2.2)." in lines
    )
    table["moco_v1"]["AP75"] = 55.0
    lines = _findings(table, raw_knn=None, seeds=seeds)
    assert any(
        s.endswith("MoCo v2 < MoCo v1 beyond the spread (-2.5, ±2.2): v2 ≥ v1 does NOT hold.") for s in lines
    )
    assert any("MoCo v1 4" in s and "sd 1.3" in s and "Welch's t-test" in s for s in lines)


def test_seed_values_and_half_ranges_and_the_table_the_mean(tmp_path):
    from demo import data as demo_data
    from demo.plan import ROWS, Plan
    from demo.report import collect_table, half_ranges, seed_values

    plan = Plan("smoke", 3, demo_data.DemoData(tmp_path / "data"), tmp_path / "work", tmp_path)
    assert plan.detection_seeds("moco_v2") == [3, 4] and plan.detection_seeds("moco_v1") == [3]
    full = Plan("full", 0, plan.data, plan.work, tmp_path)
    assert [len(full.detection_seeds(r)) for r in ROWS] == [5, 1, 7, 7]  # where Welch's margin is widest
    assert full.detection_seeds("moco_v2") == list(range(7))
    assert plan.detection_dir("moco_v2", 3).name == "moco_v2"
    assert plan.detection_dir("moco_v2", 4).name == "moco_v2_seed4"
    for row, seed, ap in (("moco_v2", 3, 20.0), ("moco_v2", 4, 23.0), ("moco_v1", 3, 10.0)):
        out = plan.detection_dir(row, seed)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"AP50": ap + 10, "AP": ap, "AP75": ap - 5}))
    table, seeds = collect_table(plan), seed_values(plan)
    assert table["moco_v2"]["AP"] == 21.5 and table["moco_v2"]["AP75"] == 16.5
    assert table["moco_v1"]["AP"] == 10.0 and table["random_init"]["AP"] is None
    assert seeds == {
        "moco_v2": {"AP50": [30.0, 33.0], "AP": [20.0, 23.0], "AP75": [15.0, 18.0]},
        "moco_v1": {"AP50": [20.0], "AP": [10.0], "AP75": [5.0]},
    }
    assert half_ranges(seeds) == {"moco_v2": {"AP50": 1.5, "AP": 1.5, "AP75": 1.5}}


def test_progress_parsers():
    log = (
        "[11/30 15:23:08 moco] epoch 0 117/117 (2.0 it/s) loss 7\n[11/30 moco] epoch 1 39/117 (2.0 it/s) x\n"
    )
    assert epoch_progress(4, first_epoch=0)(log) == pytest.approx((1 + 39 / 117) / 4)
    assert epoch_progress(2, first_epoch=1)("epoch 2 8/8 (14.9 it/s)") == pytest.approx(1.0)
    assert epoch_progress(2, first_epoch=1)("nothing yet") is None
    d2 = detectron2_progress(200)
    assert d2("eta: 0:01:00  iter: 99  total_loss: 1.0") == pytest.approx(0.9 * 100 / 200)
    assert d2("iter: 199 ...\nInference done 150/300. Dataloading") == pytest.approx(0.95)
    probe = probe_progress()
    assert probe("train features 20/235 (11 it/s)") is None
    assert probe("epoch 1/100: train loss 0.7\nepoch 25/100: train loss 0.6") == pytest.approx(0.25)
    knn = two_pass_progress()
    assert knn("kNN bank 20/59 (4.8 it/s)") == pytest.approx(20 / 59 / 2)
    assert knn("kNN bank 59/59 (5.2 it/s)\nkNN queries 5/10 (4.6 it/s)") == pytest.approx(0.75)


def test_detectron2_names_cover_resnet18_exactly():
    import torchvision

    names = {
        k: detectron2_name(k) for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")
    }
    assert names["conv1.weight"] == "backbone.stem.conv1.weight"
    assert names["bn1.running_var"] == "backbone.stem.conv1.norm.running_var"
    assert names["layer1.0.conv2.weight"] == "backbone.res2.0.conv2.weight"
    assert names["layer3.0.downsample.1.bias"] == "backbone.res4.0.shortcut.norm.bias"
    assert names["layer4.1.bn2.weight"] == "roi_heads.res5.1.conv2.norm.weight"
    assert len(set(names.values())) == len(names)  # one-to-one
    assert is_pretrainable("roi_heads.res5.0.conv1.weight")
    assert not is_pretrainable("roi_heads.res5.norm.weight")  # the extra norm is trained from scratch
    assert not is_pretrainable("roi_heads.box_predictor.cls_score.weight")
    with pytest.raises(KeyError):
        detectron2_name("fc.weight")


def test_effective_rank_counts_equal_directions():
    """k orthogonal directions of equal energy -> rank k; unequal energy -> between 1 and k."""
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    signs = torch.tensor([1.0, -1.0]).repeat(50).view(-1, 1).double()  # zero-mean coefficients
    for k in (1, 3, 10):
        x = torch.cat([signs * q[:, i] for i in range(k)], dim=0)  # each direction alone in 100 rows
        assert effective_rank(x) == pytest.approx(k, rel=1e-9)
    # two directions with energies 3:1 -> p = (3/4, 1/4), exp(entropy) by hand
    x = torch.cat([signs * q[:, 0] * 3**0.5, signs * q[:, 1]], dim=0)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(x) == pytest.approx(expected, rel=1e-9)
    assert effective_rank(x + 5.0) == pytest.approx(expected, rel=1e-9)  # a constant offset is centred away


def test_rank_section_explains_a_collapsed_supervised_backbone():
    def r(v4: float, v5: float) -> dict:
        return {
            "res4": {"effective_rank": v4, "channels": 256},
            "res5": {"effective_rank": v5, "channels": 512},
        }

    ranks = {"scenes": 64, "size": 160, "rows": {"supervised": r(6.2, 2.9), "moco_v2": r(120.7, 196.7)}}
    table = {"supervised": {"AP50": 10.2}, "moco_v2": {"AP50": 44.3}}
    md = "\n".join(_rank_section(ranks, table))
    assert "| supervised | 6.2 | 2.9 | 10.2 |" in md and "| MoCo v2 | 120.7 | 196.7 | 44.3 |" in md
    assert "10 labels" in md
    ranks["rows"]["supervised"] = r(100.0, 150.0)  # no collapse -> no explanation is printed
    assert "10 labels" not in "\n".join(_rank_section(ranks, table))
    assert _rank_section(None, table) == []


def test_compare_reports_identical_runs_and_the_largest_difference(tmp_path, capsys):
    from demo import data as demo_data
    from demo.compare import compare, numbers, with_means
    from demo.compare import main as compare_main
    from demo.plan import ROWS, Plan

    def fake_run(work, ap_shift: float) -> None:
        plan = Plan("smoke", 0, demo_data.DemoData(tmp_path), work, work)
        for row in ROWS:
            for sub, name, val in (("knn", "knn_results.json", 70.0), ("lincls", "results.json", 80.0)):
                (work / sub / row).mkdir(parents=True, exist_ok=True)
                (work / sub / row / name).write_text(json.dumps({"top1": val}))
            for seed in plan.detection_seeds(row):
                out = plan.detection_dir(row, seed)
                out.mkdir(parents=True, exist_ok=True)
                ap = 20.0 + seed + (ap_shift if row == "moco_v2" else 0.0)
                (out / "metrics.json").write_text(json.dumps({"AP50": ap + 10, "AP": ap, "AP75": ap - 5}))
        (work / "raw_pixels").mkdir(parents=True, exist_ok=True)
        (work / "raw_pixels" / "knn_results.json").write_text(json.dumps({"top1": 79.0}))

    fake_run(tmp_path / "a", 0.0)
    fake_run(tmp_path / "b", 0.0)
    fake_run(tmp_path / "c", 0.25)
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--preset", "smoke"]) == 0
    assert '"identical": true' in capsys.readouterr().out
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "c"), "--preset", "smoke"]) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["demo_compare"]
    assert line["identical"] is False and line["max_abs_diff"]["AP"] == 0.25
    assert line["max_abs_diff"]["kNN top-1"] == 0.0 and line["max_abs_diff"]["mean AP"] == 0.25

    # a run saved as numbers.json (machine line + numbers) compares like its work dir
    saved = tmp_path / "numbers.json"
    nums = numbers(Plan("smoke", 0, demo_data.DemoData(tmp_path), tmp_path / "c", tmp_path / "c"))
    saved.write_text(json.dumps({"machine": "cpu Y", "numbers": nums}))
    assert compare_main([str(saved), str(tmp_path / "c"), "--preset", "smoke"]) == 0
    assert compare_main([str(saved), str(tmp_path / "a"), "--preset", "smoke"]) == 1
    capsys.readouterr()
    # a run with more seeds: only the shared numbers are compared (means like for like), never "identical"
    fewer = {k: v for k, v in nums.items() if "(seed 1)" not in k}
    saved.write_text(json.dumps({"machine": "cpu Y", "numbers": fewer}))
    assert compare_main([str(saved), str(tmp_path / "c"), "--preset", "smoke"]) == 1
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["demo_compare"]
    assert (
        line["only_in"] == {"A": 0, "B": 6} and line["max_abs_diff"]["mean AP"] == 0.0
    )  # 2 rows x 3 columns
    # row means: seeds shifted in opposite directions move the per-seed numbers but not the mean
    m = with_means({"MoCo v2 / AP (seed 0)": 20.0, "MoCo v2 / AP (seed 1)": 30.0, "MoCo v2 / kNN top-1": 1.0})
    assert m["MoCo v2 / mean AP"] == 25.0 and "MoCo v2 / mean kNN top-1" not in m
    shifted = {"MoCo v2 / AP (seed 0)": 21.0, "MoCo v2 / AP (seed 1)": 29.0, "MoCo v2 / kNN top-1": 1.0}
    assert compare(m, with_means(shifted)) == {"AP": 1.0, "kNN top-1": 0.0, "mean AP": 0.0}
    # a file that is not a numbers.json, or a path that is nothing: one line naming it, exit 2
    (tmp_path / "bad.json").write_text("[1, 2]")
    for bad in (tmp_path / "bad.json", tmp_path / "nowhere"):
        with pytest.raises(SystemExit) as exc:
            compare_main([str(bad), str(tmp_path / "a"), "--preset", "smoke"])
        assert exc.value.code == 2 and str(bad) in capsys.readouterr().err

    # --write-into records each comparison as one row per pair of machines, replacing an older row
    (tmp_path / "a" / "machine.txt").write_text("cpu X, ATen kernels AVX512\n")
    (tmp_path / "c" / "machine.txt").write_text("cpu X, ATen kernels AVX2\n")
    report = tmp_path / "report.md"
    results = "<!-- RESULTS -->\n| pretraining | AP |\n|---|---:|\n| MoCo v2 | 20.0 |\n<!-- /RESULTS -->\n"
    report.write_text(f"# r\n\n{results}\nfindings\n\n## Pretraining curves\n\ncurves\n")
    for other in ("b", "c", "c"):
        compare_main(
            [str(tmp_path / "a"), str(tmp_path / other), "--preset", "smoke", "--write-into", str(report)]
        )
    text = report.read_text()
    rows = [r for r in text.split(BEGIN)[1].split(END)[0].splitlines() if r.startswith("| cpu")]
    assert rows == [
        f"| cpu X, ATen kernels AVX512 | (no machine.txt in {tmp_path / 'b'}) | yes | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |",
        "| cpu X, ATen kernels AVX512 | cpu X, ATen kernels AVX2 | no | 0.00 | 0.00 | 0.25 | 0.25 | 0.25 | 0.25 | 0.25 | 0.25 |",
    ]
    assert text.index(END) < text.index("## Pretraining curves") and text.count(BEGIN) == 1

    # a regenerated report keeps the block while its results table is unchanged, and drops it otherwise
    assert _kept_comparisons(report, [results])[0].startswith(BEGIN)
    assert _kept_comparisons(report, [results.replace("20.0", "20.1")]) == []
    assert _kept_comparisons(tmp_path / "missing.md", [results]) == []
