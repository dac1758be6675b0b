"""Offline kNN CLI: both checkpoint formats, results equal a hand-built pipeline, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_lincls import CLASSES, make_image_folder, moco_checkpoint

from moco_d2.core.images import SafeImageFolder, build_eval_transform
from moco_d2.evaluation.features import ResNetTrunk, topk_correct
from moco_d2.evaluation.knn import knn_class_scores, main
from moco_d2.evaluation.lincls import main as lincls_main

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "configs/lincls/knn_in1k.yaml"


def _argv(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config-file", CONFIG, "MODEL.WEIGHTS", str(ckpt), "DATA.ROOT", str(data), "OUTPUT_DIR", str(out),
        "DATA.CROP_SIZE", "16", "DATA.RESIZE", "18", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0",
        "TRAIN.DEVICE", "cpu", "KNN.K", "5", "KNN.QUERY_CHUNK", "2", "KNN.BANK_CHUNK", "7", *extra,
    ]  # fmt: skip


def _reference(backbone: dict, data: Path, k: int, t: float) -> tuple[float, float]:
    net = torchvision.models.resnet18()
    net.load_state_dict(backbone, strict=False)
    trunk = ResNetTrunk(net).eval()
    tf = build_eval_transform(16, 18)
    feats = {}
    for split in ("train", "val"):
        ds = SafeImageFolder(data / split, tf)
        with torch.no_grad():
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            feats[split] = (F.normalize(trunk(x), dim=1), torch.tensor(ds.targets))
    scores = knn_class_scores(feats["val"][0], *feats["train"], CLASSES, k=k, t=t)
    hits = topk_correct(scores, feats["val"][1])
    return 100 * hits[:, 0].mean().item(), 100 * hits[:, 1].mean().item()


@pytest.mark.parametrize("official", [False, True])
def test_knn_cli_matches_reference_pipeline(tmp_path: Path, official: bool):
    data = make_image_folder(tmp_path / "data")
    backbone = moco_checkpoint(tmp_path / "ckpt.pth", official=official)
    res = main(_argv(tmp_path / "ckpt.pth", data, tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "knn_results.json").read_text()) == res
    assert (res["num_train"], res["num_val"], res["k"], res["t"]) == (18, 9, 5, 0.07)
    assert res["arch"] == "resnet18" and res["checkpoint"] == str(tmp_path / "ckpt.pth")
    assert ("official" in res["source"]) == official
    top1, top5 = _reference(backbone, data, k=5, t=0.07)
    assert res["top1"] == pytest.approx(top1) and res["top5"] == pytest.approx(top5)


def test_knn_and_linear_probe_share_one_feature_cache(tmp_path: Path, monkeypatch):
    """DATA.FEATURES_CACHE: the kNN result is the uncached one; the linear probe then reads the kNN's
    features instead of the images and trains the fc it trains on its own extraction (same batch size:
    the same features bit for bit); a checkpoint rewritten in place or a torn file is extracted again."""
    import moco_d2.evaluation.features as features

    data = make_image_folder(tmp_path / "data")
    ckpt, cache = tmp_path / "ckpt.pth", tmp_path / "shared" / "features.pt"
    moco_checkpoint(ckpt)
    plain = main(_argv(ckpt, data, tmp_path / "plain"))
    cached = main(_argv(ckpt, data, tmp_path / "cached", "DATA.FEATURES_CACHE", str(cache)))
    assert cached == plain and cache.is_file()

    def probe(out: str, *extra: str) -> dict:
        return lincls_main([
            "--config-file", "configs/lincls/lincls_in1k.yaml", "MODEL.WEIGHTS", str(ckpt), "MODEL.ARCH",
            "resnet18", "DATA.ROOT", str(data), "OUTPUT_DIR", str(tmp_path / out), "DATA.CROP_SIZE", "16",
            "DATA.RESIZE", "18", "DATA.NUM_WORKERS", "0", "TRAIN.DEVICE", "cpu", "TRAIN.PRECOMPUTED_FEATURES",
            "True", "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "3", "SOLVER.STEPS", "[2]", "LOG.TENSORBOARD",
            "False", *extra,
        ])  # fmt: skip

    own = probe("probe_own")
    real_extract = features.extract_features

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    shared = probe("probe_shared", "DATA.FEATURES_CACHE", str(cache))
    assert json.dumps(shared, sort_keys=True) == json.dumps(own, sort_keys=True)
    assert main(_argv(ckpt, data, tmp_path / "again", "DATA.FEATURES_CACHE", str(cache))) == plain

    moco_checkpoint(ckpt, seed=1)  # same path, other weights: another key
    with pytest.raises(AssertionError, match="extracted again"):
        main(_argv(ckpt, data, tmp_path / "other", "DATA.FEATURES_CACHE", str(cache)))
    monkeypatch.setattr(features, "extract_features", real_extract)
    moco_checkpoint(ckpt)
    cache.write_bytes(cache.read_bytes()[:100])  # torn (e.g. copied while written): a miss, rewritten
    assert main(_argv(ckpt, data, tmp_path / "torn", "DATA.FEATURES_CACHE", str(cache))) == plain
    assert "unreadable" in (tmp_path / "torn" / "log.txt").read_text()
    assert torch.load(cache, weights_only=True)["train"].shape == (18, 512)


def test_knn_cli_errors_are_one_line(tmp_path: Path, capsys):
    torch.save({"state_dict": {"module.head.weight": torch.zeros(2)}}, tmp_path / "noenc.pth")
    moco_checkpoint(tmp_path / "r18.pth")
    cases = [
        (_argv(tmp_path / "noenc.pth", tmp_path, tmp_path / "o"), "holds no ResNet encoder weights"),
        (
            _argv(tmp_path / "r18.pth", tmp_path, tmp_path / "o", "MODEL.ARCH", "resnet50"),
            "MODEL.ARCH is 'resnet50'",
        ),
        (_argv(tmp_path / "r18.pth", tmp_path / "missing", tmp_path / "o"), "does not exist"),
        (_argv(tmp_path / "r18.pth", tmp_path, tmp_path / "o", "KNN.T", "0.0"), "KNN.T > 0"),
    ]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith("error: ") and msg in err and "\n" not in err, err
