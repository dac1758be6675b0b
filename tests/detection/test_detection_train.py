"""End to end on a tiny generated VOC-format dataset: train_net's code path, weights, errors, trials."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from toy_data import TOY_CLASSES, write_toy_voc

from convert import to_detectron2
from detection import trials
from detection.checkpoint import VerifiedCheckpointer
from detection.config import load_detection_config
from detection.train_net import run
from moco_d2.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "voc_c4.yaml")


def toy_opts(data: Path, out: Path, weights: str, max_iter: int = 2) -> list[str]:
    """Overrides that shrink the VOC protocol to a ResNet-18 on 64-96 px images (seconds on a CPU)."""
    specs = [
        {"name": f"toy_{split}", "root": str(data), "split": split, "classes": list(TOY_CLASSES)}
        for split in ("trainval", "test")
    ]
    return [
        *("MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out)),
        *(
            "MODEL.RESNETS.DEPTH",
            "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS",
            "64",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "3",
        ),
        *(
            "DATASETS.VOC_CUSTOM",
            repr(specs),
            "DATASETS.TRAIN",
            "('toy_trainval',)",
            "DATASETS.TEST",
            "('toy_test',)",
        ),
        *("INPUT.MIN_SIZE_TRAIN", "(64, 96)", "INPUT.MAX_SIZE_TRAIN", "160"),
        *("INPUT.MIN_SIZE_TEST", "80", "INPUT.MAX_SIZE_TEST", "160"),
        *("SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "(1,)"),
        *("SOLVER.WARMUP_ITERS", "1", "SOLVER.BASE_LR", "0.01"),
        *("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32"),
        *("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8"),  # res5 then runs on 4x4 maps
        *("MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50"),
        *("MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "10"),
        *("TEST.PRECISE_BN.NUM_ITER", "1", "TEST.VIS_NUM_IMAGES", "2", "DATALOADER.NUM_WORKERS", "0"),
    ]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_voc")
    write_toy_voc(str(root), {"trainval": 8, "test": 4}, seed=0)
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-18 with distinct random values everywhere (BN statistics included), through convert/."""
    tmp = tmp_path_factory.mktemp("weights")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for k, t in torchvision.models.resnet18().state_dict().items():
        if k.endswith("running_var"):
            state[k] = torch.rand(t.shape, generator=gen) + 0.5
        elif t.is_floating_point():
            state[k] = torch.randn(t.shape, generator=gen)
        else:
            state[k] = t
    torch.save(state, tmp / "r18.pth")
    to_detectron2(tmp / "r18.pth", tmp / "r18.pkl", validate=False)
    return tmp / "r18.pkl", state


def toy_model(data: Path, tmp: Path):
    cfg = load_detection_config(CONFIG, toy_opts(data, tmp, ""))
    return build_model(cfg)


def torchvision_to_model_key(k: str) -> str:
    """Where a torchvision ResNet tensor must land in the C4 detector (written independently of convert/)."""
    parts = k.split(".")
    if parts[0] in ("conv1", "bn1"):
        return "backbone.stem.conv1." + ("weight" if parts[0] == "conv1" else "norm." + parts[1])
    stage, block, layer, name = int(parts[0][5:]), parts[1], parts[2], parts[-1]
    prefix = f"backbone.res{stage + 1}" if stage < 4 else "roi_heads.res5"
    if layer == "downsample":
        sub = "shortcut.weight" if parts[3] == "0" else f"shortcut.norm.{name}"
    elif layer.startswith("conv"):
        sub = f"{layer}.weight"
    else:
        sub = f"conv{layer[2:]}.norm.{name}"
    return f"{prefix}.{block}.{sub}"


def test_convert_output_is_loaded_into_the_detector(converted, toy_data, tmp_path):
    pkl, state = converted
    model = toy_model(toy_data, tmp_path)
    fresh_norm = model.roi_heads.res5.norm.weight.detach().clone()
    checkpointer = VerifiedCheckpointer(model)
    checkpointer.load(str(pkl))
    got = model.state_dict()
    compared = 0
    for k, v in state.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(got[torchvision_to_model_key(k)], v), k
        compared += 1
    report = checkpointer.last_report
    assert compared == len(report.loaded)  # every loaded tensor is one of the torchvision tensors
    assert report.count("backbone.")[0] == report.count("backbone.")[1] > 0
    assert report.count("roi_heads.res5.0.")[0] == report.count("roi_heads.res5.0.")[1] > 0
    assert all(
        k.startswith(("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.res5.norm."))
        for k in report.not_loaded
    )
    assert torch.equal(model.roi_heads.res5.norm.weight, fresh_norm)  # the extra BN is trained from scratch


def test_self_built_detectron2_pickle_values_arrive_and_partial_weights_are_refused(toy_data, tmp_path):
    """A Detectron2-format pickle written here (backbone names without prefixes, heuristic matching)."""
    model = toy_model(toy_data, tmp_path)
    rng = np.random.default_rng(1)
    arrays = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") or k.startswith("roi_heads.res5.norm."):
            continue
        if k.startswith("backbone."):
            arrays[k[len("backbone.") :]] = rng.standard_normal(tuple(v.shape)).astype(np.float32)
        elif k.startswith("roi_heads.res5."):
            arrays[k[len("roi_heads.") :]] = rng.standard_normal(tuple(v.shape)).astype(np.float32)
    full = tmp_path / "full.pkl"
    full.write_bytes(pickle.dumps({"model": arrays, "__author__": "test", "matching_heuristics": True}))
    VerifiedCheckpointer(model).load(str(full))
    got = model.state_dict()
    for name, a in arrays.items():
        key = ("roi_heads." if name.startswith("res5.") else "backbone.") + name
        assert np.array_equal(got[key].numpy(), a), key
    partial = tmp_path / "partial.pkl"
    dropped = {k: a for k, a in arrays.items() if not k.startswith("res4.1.")}
    partial.write_bytes(pickle.dumps({"model": dropped, "__author__": "test", "matching_heuristics": True}))
    with pytest.raises(UserError, match=r"backbone tensors were not loaded \(e\.g\. backbone\.res4\.1\."):
        VerifiedCheckpointer(toy_model(toy_data, tmp_path)).load(str(partial))


def read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_resume_and_eval_only_through_train_net(converted, toy_data, tmp_path):
    pkl, _ = converted
    out = tmp_path / "run"
    run(["--config-file", CONFIG, *toy_opts(toy_data, out, str(pkl), max_iter=2)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "toy_test" and metrics["iteration"] == 2
    assert set(metrics["per_class_AP50"]) == set(TOY_CLASSES)
    for key in ("AP", "AP50", "AP75"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["AP50"] == pytest.approx(np.mean(list(metrics["per_class_AP50"].values())))
    bbox = metrics["results"]["toy_test"]["bbox"]
    assert bbox["AP"] == pytest.approx(np.mean([bbox[f"AP-{c}"] for c in TOY_CLASSES]))
    assert sorted(p.name for p in (out / "vis" / "toy_test").iterdir()) == ["000008.jpg", "000009.jpg"]
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert "roi_heads.res5.norm.weight" in final and final["roi_heads.res5.norm.weight"].shape == (512,)

    # Without --resume the run's checkpoints would be overwritten: refused, nothing touched.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("model_*.pth")}
    with pytest.raises(SystemExit) as refused:
        run(["--config-file", CONFIG, *toy_opts(toy_data, out, str(pkl), max_iter=3)])
    assert refused.value.code == 2 and before == {
        p.name: p.stat().st_mtime_ns for p in out.glob("model_*.pth")
    }

    # --resume continues at iteration 2 from the last checkpoint (the converted weights are not reloaded).
    run(["--config-file", CONFIG, "--resume", *toy_opts(toy_data, out, str(pkl), max_iter=3)])
    logged = [r["iteration"] for r in read_json_lines(out / "train_log.json") if "total_loss" in r]
    assert logged == [1, 2]  # the last training iteration of each run: 0-1, then only 2
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["iteration"] == 3

    # --eval-only on the final checkpoint reproduces the numbers of the evaluation after training.
    opts = toy_opts(toy_data, tmp_path / "eval", str(out / "model_final.pth"))
    run(["--config-file", CONFIG, "--eval-only", *opts])
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["iteration"] is None
    assert evaluated["results"] == resumed["results"]


def test_wrong_weights_and_bad_dataset_specs_are_one_line_errors(toy_data, tmp_path, capsys):
    cases = [
        (["MODEL.WEIGHTS", str(tmp_path / "nope.pkl")], "MODEL.WEIGHTS '" + str(tmp_path / "nope.pkl")),
        (["MODEL.WEIGHTS", ""], "MODEL.WEIGHTS is empty"),
        (["MODEL.ROI_HEADS.NUM_CLASSES", "20"], "NUM_CLASSES is 20 but dataset 'toy_trainval' has 3 classes"),
        (["DATASETS.VOC_CUSTOM", "[{'name': 'x', 'root': 'y'}]"], r"DATASETS.VOC_CUSTOM[0]: expected keys"),
        (["DATASETS.TRAIN", "('no_such_set',)"], "are not registered"),
    ]
    weights = tmp_path / "w.pkl"
    weights.write_bytes(pickle.dumps({"model": {}, "__author__": "test"}))
    garbage = tmp_path / "garbage.pkl"
    garbage.write_text("not a pickle\n")
    cases.append(
        (
            ["MODEL.WEIGHTS", str(garbage)],
            f"MODEL.WEIGHTS '{garbage}' is not a readable Detectron2 checkpoint",
        )
    )
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            run(["--config-file", CONFIG, *toy_opts(toy_data, tmp_path, str(weights)), *extra])
        last = capsys.readouterr().err.strip().splitlines()[-1]  # (earlier lines: library warnings)
        assert exc.value.code == 2 and last.startswith("error: ") and message in last, last


def test_missing_voc_data_names_the_layout(tmp_path):
    """Built-in VOC splits are found through DETECTRON2_DATASETS; a missing one is one clear error."""
    root = tmp_path / "d2data"
    write_toy_voc(str(root / "VOC2007"), {"trainval": 2, "test": 2})  # VOC2012 is missing
    weights = tmp_path / "w.pkl"
    weights.write_bytes(pickle.dumps({"model": {}, "__author__": "test"}))
    env = {**os.environ, "DETECTRON2_DATASETS": str(root)}
    cmd = [sys.executable, str(ROOT / "detection" / "train_net.py"), "--config-file", CONFIG]
    cmd += ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(weights)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert (
        err.startswith("error: dataset not found: voc_2012_trainval (missing ")
        and "voc_2007" not in err.split(";")[0]
    )
    assert str(root / "VOC2012" / "ImageSets" / "Main" / "trainval.txt") in err
    assert f"$DETECTRON2_DATASETS (={root})" in err and "VOC2012/{Annotations/<id>.xml" in err


def test_trials_statistics_hand_computed():
    mean, std = trials.mean_std([80.0, 82.0, 84.0])
    assert (mean, std) == (82.0, 2.0)
    assert trials.mean_std([5.0]) == (5.0, 0.0)
    runs = [
        {"AP50": 80.0, "AP": 50.0, "AP75": 55.0, "per_class_AP50": {"a": 70.0, "b": 90.0}},
        {"AP50": 84.0, "AP": 52.0, "AP75": 57.0, "per_class_AP50": {"a": 74.0, "b": None}},
    ]
    s = trials.summarize_trials(runs)
    assert s["n"] == 2 and s["AP50"] == {"mean": 82.0, "std": pytest.approx(8**0.5)}
    assert s["per_class_AP50"] == {
        "a": {"mean": 72.0, "std": pytest.approx(8**0.5)},
        "b": {"mean": 90.0, "std": 0.0},
    }
    rows = [{"trial": i, "seed": i, **{k: r[k] for k in ("AP50", "AP", "AP75")}} for i, r in enumerate(runs)]
    table = trials.markdown_table(rows, s)
    assert "| 0 | 0 | 80.00 | 50.00 | 55.00 |" in table
    assert "| mean ± std (n=2) | | 82.00 ± 2.83 | 51.00 ± 1.41 | 56.00 ± 1.41 |" in table


def test_trials_run_independent_seeds_and_reuse_finished_ones(converted, toy_data, tmp_path, monkeypatch):
    pkl, _ = converted
    out = tmp_path / "trials"
    opts = toy_opts(toy_data, tmp_path / "unused", str(pkl), max_iter=2)
    i = opts.index("OUTPUT_DIR")
    opts = opts[:i] + opts[i + 2 :] + ["TEST.PRECISE_BN.ENABLED", "False", "TEST.VIS_NUM_IMAGES", "0"]
    argv = [
        "--config-file",
        CONFIG,
        "--weights",
        str(pkl),
        "--trials",
        "2",
        "--seed",
        "7",
        "--output",
        str(out),
        *opts,
    ]
    report = trials.main(argv)
    assert [(r["trial"], r["seed"]) for r in report["trials"]] == [(0, 7), (1, 8)]
    for r in report["trials"]:
        m = json.loads((Path(r["output_dir"]) / "metrics.json").read_text())
        assert (r["AP50"], r["AP"], r["AP75"]) == (m["AP50"], m["AP"], m["AP75"])
        cfg_dump = (Path(r["output_dir"]) / "config.yaml").read_text()
        assert f"SEED: {r['seed']}" in cfg_dump
    assert report["summary"]["AP50"]["mean"] == pytest.approx(np.mean([r["AP50"] for r in report["trials"]]))
    assert json.loads((out / "results.json").read_text())["summary"] == report["summary"]
    assert "mean ± std (n=2)" in (out / "results.md").read_text()
    # Finished trials are read back, not rerun.
    monkeypatch.setattr(trials, "run_trial", lambda *a: pytest.fail("a finished trial was rerun"))
    assert trials.main(argv)["summary"] == report["summary"]
