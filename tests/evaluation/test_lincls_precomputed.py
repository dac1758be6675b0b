"""The linear probe on features computed once (TRAIN.PRECOMPUTED_FEATURES, TRAIN.STANDARDIZE_FEATURES)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moco_d2.core.backbone import build_resnet
from moco_d2.core.errors import UserError
from moco_d2.core.images import build_eval_transform, labelled_split_pair
from moco_d2.core.metrics import read_metrics
from moco_d2.evaluation.lincls import main
from tests.evaluation.test_lincls import make_image_folder, moco_checkpoint, opts

pytestmark = pytest.mark.usefixtures("one_thread")


def _probe(data: Path, out: Path, ckpt: Path, **extra) -> dict:
    argv = opts(
        data,
        out,
        **{
            "MODEL.WEIGHTS": ckpt,
            "TRAIN.PRECOMPUTED_FEATURES": True,
            "SOLVER.BASE_LR": 0.1,
            "SOLVER.EPOCHS": 6,
            "SOLVER.STEPS": "[3, 5]",
        }
        | extra,
    )
    return main(["--config-file", "configs/lincls/lincls_in1k.yaml", *argv])


def _val_logits(model: torch.nn.Module, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tf = build_eval_transform(16, 18, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    _, val = labelled_split_pair(data, "train", "val", tf, tf, 0.0)
    images, labels = zip(*(val[i] for i in range(len(val))))
    with torch.no_grad():
        return model.eval()(torch.stack(images)), torch.tensor(labels)


def test_standardised_probe_folds_into_a_plain_classifier_and_reuses_its_features(
    tmp_path: Path, monkeypatch
):
    data = make_image_folder(tmp_path / "data", n_train=8, n_val=4)
    ckpt = tmp_path / "moco.pth"
    backbone = moco_checkpoint(ckpt)
    out = tmp_path / "probe"
    # a small lr keeps the val loss far from 0, so the folded classifier's loss is a sharp check
    small_lr = {"TRAIN.STANDARDIZE_FEATURES": True, "SOLVER.BASE_LR": 0.002}
    res = _probe(data, out, ckpt, **small_lr)
    assert res["sanity_check"] == "passed" and res["epochs"] == 6 and res["num_val"] == 12
    val = [r for r in read_metrics(out / "metrics.jsonl") if "val/top1" in r]
    assert [r["val/epoch"] for r in val] == list(range(1, 7))  # one point per epoch: the curve
    assert val[-1]["val/top1"] == pytest.approx(res["top1"])

    # The saved model is the backbone (unchanged) + an fc with the standardisation folded in: on raw
    # images it reproduces the reported val loss (to float32 rounding of the fold).
    saved = torch.load(out / "model_final.pth", weights_only=True)
    sd = {k.removeprefix("module."): v for k, v in saved["state_dict"].items()}
    assert all(torch.equal(sd[k], v) for k, v in backbone.items())
    model = build_resnet("resnet18", num_classes=3)
    model.load_state_dict(sd)
    logits, labels = _val_logits(model, data)
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert val[-1]["val/loss"] > 0.1
    # float32: features ~1e0..1e1, 512-term dot products -> relative error well under 1e-4
    assert loss == pytest.approx(val[-1]["val/loss"], rel=1e-4)
    assert (logits.argmax(1) == labels).float().mean().item() * 100 == pytest.approx(res["top1"])

    # A rerun in the same OUTPUT_DIR reads the cached features (no extraction) and trains the same fc.
    cache = torch.load(out / "features.pt", weights_only=True)
    assert cache["train"].shape == (24, 512) and cache["val"].shape == (12, 512)
    import moco_d2.evaluation.features as features

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    again = _probe(data, out, ckpt, **small_lr)
    assert json.dumps(again, sort_keys=True) == json.dumps(res, sort_keys=True)
    # ... but another checkpoint is another cache key: extracted again
    moco_checkpoint(tmp_path / "other.pth", seed=1)
    with pytest.raises(AssertionError, match="extracted again"):
        _probe(data, out, tmp_path / "other.pth", **small_lr)


def test_probe_on_raw_features_and_config_errors(tmp_path: Path, capsys):
    data = make_image_folder(tmp_path / "data")
    ckpt = tmp_path / "moco.pth"
    moco_checkpoint(ckpt)
    res = _probe(data, tmp_path / "raw", ckpt)
    assert "standardised" not in res["features"]
    with pytest.raises(SystemExit):
        _probe(data, tmp_path / "bad", ckpt, **{"MODEL.FREEZE_BACKBONE": False})
    assert "TRAIN.PRECOMPUTED_FEATURES needs MODEL.FREEZE_BACKBONE True" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _probe(
            data,
            tmp_path / "bad2",
            ckpt,
            **{"TRAIN.PRECOMPUTED_FEATURES": False, "TRAIN.STANDARDIZE_FEATURES": True},
        )
    assert "TRAIN.STANDARDIZE_FEATURES needs TRAIN.PRECOMPUTED_FEATURES True" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a cache the crop-augmented recipe would silently ignore
        _probe(
            data,
            tmp_path / "bad3",
            ckpt,
            **{"TRAIN.PRECOMPUTED_FEATURES": False, "DATA.FEATURES_CACHE": str(tmp_path / "f.pt")},
        )
    assert "DATA.FEATURES_CACHE needs TRAIN.PRECOMPUTED_FEATURES True" in capsys.readouterr().err
    assert UserError  # the errors above are UserErrors turned into one line by exit_on_user_error
