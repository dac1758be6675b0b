"""Round trips: every accepted input format -> Detectron2 pickle -> C4 detector, values bit-identical.

The checks here walk the detector's modules (stem, res2..res4 in the backbone, res5 in the ROI head) and
compare them with the torchvision tensors by structure, independently of the converter's name mapping.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer

from convert import ValidationError, to_detectron2, to_torchvision
from convert.converter import DEFAULT_CONFIG
from convert.validate import build_c4_model
from moco_d2.core import backbone as bb
from moco_d2.core.errors import UserError


def random_resnet_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision state dict where every tensor, BN statistics included, holds distinct random values.

    A fresh model's BN tensors are all 0 or 1, which would let a missed or swapped key go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    state = bb.build_resnet(arch).state_dict()
    out = {}
    for key, t in state.items():
        if key.endswith("running_var"):
            out[key] = torch.rand(t.shape, generator=gen) + 0.5
        elif t.is_floating_point():
            out[key] = torch.randn(t.shape, generator=gen)
        else:
            out[key] = torch.randint(1, 1000, t.shape, generator=gen)
    return out


def wrap(fmt: str, src: dict[str, torch.Tensor], arch: str) -> dict:
    """``src`` packed the way each accepted producer saves it."""
    head = {
        "fc.0.weight": torch.randn(64, 8),
        "fc.0.bias": torch.randn(64),
        "fc.2.weight": torch.randn(16, 64),
    }
    encoder = {k: v for k, v in src.items() if not k.startswith("fc.")} | head
    if fmt in ("moco_ours", "moco_official"):
        sd = {f"module.encoder_q.{k}": v for k, v in encoder.items()}
        # The key encoder has the same names; some of its tensors differ, so taking it by mistake shows
        # (the rest share storage with the query encoder, which keeps the file small).
        differ = {"conv1.weight", "layer3.0.downsample.0.weight", "layer4.1.bn2.running_var"}
        sd |= {f"module.encoder_k.{k}": -v if k in differ else v for k, v in encoder.items()}
        sd |= {"module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
        ckpt = {"epoch": 3, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
        if fmt == "moco_ours":
            ckpt |= {"iteration": 30, "epoch_step": 0, "config": "MODEL:\n  ARCH: x\n", "kind": "moco"}
        return ckpt
    if fmt == "lincls_ours":
        sd = {f"module.{k}": v for k, v in src.items()}
        return {
            "epoch": 9,
            "arch": arch,
            "state_dict": sd,
            "best_acc1": 1.5,
            "optimizer": {},
            "kind": "lincls",
        }
    if fmt == "torchvision":
        return dict(src)
    if fmt == "torchvision_module":
        return {f"module.{k}": v for k, v in src.items()}
    raise ValueError(fmt)


FORMATS = {
    "moco_ours": bb.SOURCE_MOCO_OURS,
    "moco_official": bb.SOURCE_MOCO_OFFICIAL,
    "lincls_ours": bb.SOURCE_LINCLS_OURS,
    "torchvision": bb.SOURCE_TORCHVISION,
    "torchvision_module": bb.SOURCE_TORCHVISION,
}


def reset_and_load(model: torch.nn.Module, path) -> None:
    """Poison every model tensor, then load ``path`` with Detectron2's stock checkpointer."""
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(float("nan") if t.is_floating_point() else -1)
    DetectionCheckpointer(model).load(str(path))


def assert_backbone_identical(model: torch.nn.Module, src: dict[str, torch.Tensor]) -> None:
    """Every stem/res2..res5 conv and norm tensor equals its torchvision counterpart, found by structure."""
    compared = 0

    def same(tensor: torch.Tensor, key: str) -> None:
        nonlocal compared
        assert torch.equal(tensor, src[key]), key
        compared += 1

    def same_norm(norm: torch.nn.Module, prefix: str) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            same(getattr(norm, leaf), f"{prefix}.{leaf}")

    same(model.backbone.stem.conv1.weight, "conv1.weight")
    same_norm(model.backbone.stem.conv1.norm, "bn1")
    stages = [model.backbone.res2, model.backbone.res3, model.backbone.res4, model.roi_heads.res5]
    for i, stage in enumerate(stages, start=1):
        blocks = [m for name, m in stage.named_children() if name != "norm"]
        assert len(blocks) == len({k.split(".")[1] for k in src if k.startswith(f"layer{i}.")})
        for j, block in enumerate(blocks):
            p = f"layer{i}.{j}"
            for k in (1, 2, 3):
                conv = getattr(block, f"conv{k}", None)
                if conv is None:
                    assert f"{p}.conv{k}.weight" not in src
                    continue
                same(conv.weight, f"{p}.conv{k}.weight")
                same_norm(conv.norm, f"{p}.bn{k}")
            if block.shortcut is None:
                assert f"{p}.downsample.0.weight" not in src
            else:
                same(block.shortcut.weight, f"{p}.downsample.0.weight")
                same_norm(block.shortcut.norm, f"{p}.downsample.1")
    assert compared == sum(
        1 for k in src if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    )


def assert_heads_untouched(model: torch.nn.Module) -> None:
    """What a backbone cannot provide stays as it was (here: the NaN poison)."""
    for name, t in model.state_dict().items():
        if name.startswith(("proposal_generator.", "roi_heads.box_predictor.", "roi_heads.res5.norm.")):
            assert torch.isnan(t).all() if t.is_floating_point() else (t == -1).all(), name


@pytest.fixture(scope="module")
def r50():
    return random_resnet_state("resnet50", seed=0)


@pytest.fixture(scope="module")
def r50_target():
    return build_c4_model("resnet50", DEFAULT_CONFIG)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_r50_round_trip_every_format(fmt, r50, r50_target, tmp_path):
    src = tmp_path / "in.pth"
    torch.save(wrap(fmt, r50, "resnet50"), src)
    out = tmp_path / "out.pkl"

    report = to_detectron2(src, out, target=r50_target)

    assert report.source == FORMATS[fmt]
    assert report.arch == "resnet50"
    assert report.validation.ok and report.validation.matched == report.num_tensors
    n_bn = sum(k.endswith("num_batches_tracked") for k in r50)
    assert report.num_tensors == len(r50) - 2 - n_bn  # fc.weight/fc.bias and the BN step counters go
    assert set(report.validation.unmatched) <= {"RPN", "box predictor", "res5 extra norm", "BN step counters"}

    model = r50_target.model
    reset_and_load(model, out)
    assert_backbone_identical(model, r50)
    assert_heads_untouched(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth", "out.pkl"]  # no temp file left


def test_pickle_layout(r50, tmp_path):
    src = tmp_path / "in.pth"
    torch.save(wrap("moco_ours", r50, "resnet50"), src)
    to_detectron2(src, tmp_path / "out.pkl", validate=False)  # loading is covered by the round trips
    with open(tmp_path / "out.pkl", "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["matching_heuristics"] is True
    model = data["model"]
    assert all(isinstance(v, np.ndarray) for v in model.values())
    assert not any("num_batches_tracked" in k or k.startswith("fc") for k in model)
    # Hand-written spot checks of the naming rules.
    np.testing.assert_array_equal(model["stem.conv1.weight"], r50["conv1.weight"].numpy())
    np.testing.assert_array_equal(model["stem.conv1.norm.running_var"], r50["bn1.running_var"].numpy())
    np.testing.assert_array_equal(
        model["res2.0.shortcut.weight"], r50["layer1.0.downsample.0.weight"].numpy()
    )
    np.testing.assert_array_equal(model["res3.2.conv3.norm.bias"], r50["layer2.2.bn3.bias"].numpy())
    np.testing.assert_array_equal(
        model["res5.0.shortcut.norm.running_mean"], r50["layer4.0.downsample.1.running_mean"].numpy()
    )
    assert model["res4.5.conv2.weight"].dtype == np.float32


def test_r18_into_r18_c4_with_basic_block_res5(tmp_path):
    r18 = random_resnet_state("resnet18", seed=1)
    src = tmp_path / "in.pth"
    torch.save(wrap("moco_ours", r18, "resnet18"), src)
    target = build_c4_model("resnet18", DEFAULT_CONFIG)

    report = to_detectron2(src, tmp_path / "out.pkl", target=target)

    assert report.arch == "resnet18" and report.validation.ok
    model = target.model
    assert [type(b).__name__ for b in model.roi_heads.res5[:2]] == ["BasicBlock", "BasicBlock"]
    reset_and_load(model, tmp_path / "out.pkl")
    assert_backbone_identical(model, r18)
    assert_heads_untouched(model)


def test_small_image_resnet_into_its_registered_c4_backbone(tmp_path):
    """resnet18_small (3x3 stride-2 stem, no max-pool, width 16): every tensor, the 3x3 stem included,
    lands unchanged in Detectron2's build_small_resnet_backbone + BasicBlock res5, at the right strides."""
    from detection.backbone import SmallImageStem

    small = random_resnet_state("resnet18_small", seed=2)
    assert small["conv1.weight"].shape == (16, 3, 3, 3) and small["layer4.1.conv2.weight"].shape[0] == 128
    src = tmp_path / "in.pth"
    torch.save(wrap("moco_ours", small, "resnet18_small"), src)
    target = build_c4_model("resnet18_small", DEFAULT_CONFIG)

    report = to_detectron2(src, tmp_path / "out.pkl", target=target)

    assert report.arch == "resnet18_small" and report.validation.ok
    assert report.validation.matched == report.num_tensors
    assert report.num_tensors == sum(
        1 for k in small if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    )
    model = target.model
    stem = model.backbone.stem
    assert type(stem) is SmallImageStem and stem.stride == 2
    assert (stem.conv1.kernel_size, stem.conv1.stride) == ((3, 3), (2, 2))
    assert model.backbone.output_shape()["res4"].stride == 8  # stem 2 -> res2 2, res3 4, res4 8
    assert model.roi_heads.pooler.level_poolers[0].spatial_scale == 1 / 8
    assert [type(b).__name__ for b in model.roi_heads.res5[:2]] == ["BasicBlock", "BasicBlock"]
    reset_and_load(model, tmp_path / "out.pkl")
    assert_backbone_identical(model, small)
    assert_heads_untouched(model)


def test_small_image_resnet_is_told_from_resnet18_by_its_stem(tmp_path):
    """Same block counts as resnet18: the 3x3 16-channel stem names it; a stock checkpoint is not taken."""
    assert bb.infer_resnet_arch(random_resnet_state("resnet18_small", seed=3)) == "resnet18_small"
    src = tmp_path / "in.pth"
    torch.save(random_resnet_state("resnet18", seed=3), src)
    with pytest.raises(UserError, match="resnet18_small"):
        to_detectron2(src, tmp_path / "out.pkl", arch="resnet18_small", validate=False)


def test_to_torchvision_loads_with_only_fc_missing(r50, tmp_path):
    src = tmp_path / "in.pth"
    torch.save(wrap("moco_official", r50, "resnet50"), src)
    out = tmp_path / "backbone.pth"

    report = to_torchvision(src, out)

    assert report.validation.ok
    model = torchvision.models.resnet50()
    result = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, r50[key]), key


def test_validation_catches_a_wrong_mapping(r50, r50_target, tmp_path, monkeypatch):
    """A converter bug (two same-shaped tensors swapped, one key misnamed) fails validation; no file is left."""
    import convert.converter as converter

    real = converter.to_detectron2_names

    def buggy(state):
        out = real(state)
        a, b = "res4.0.conv2.weight", "res4.1.conv2.weight"
        out[a], out[b] = out[b], out[a]
        out["res5.1.conv1.bn.weight"] = out.pop("res5.1.conv1.norm.weight")
        return out

    monkeypatch.setattr(converter, "to_detectron2_names", buggy)
    src = tmp_path / "in.pth"
    torch.save(wrap("torchvision", r50, "resnet50"), src)

    with pytest.raises(ValidationError) as info:
        to_detectron2(src, tmp_path / "out.pkl", target=r50_target)

    problems = "\n".join(info.value.result.problems)
    assert "roi_heads.res5.1.conv1.norm.weight received no pretrained weights" in problems
    assert "the file holds res5.1.conv1.bn.weight, which is not a converted backbone tensor" in problems
    assert "backbone.res4.0.conv2.weight differs" in problems
    assert "backbone.res4.1.conv2.weight differs" in problems
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


def test_validation_rejects_stride_in_1x1_config(r50, tmp_path):
    """torchvision strides in the 3x3 conv; a config that says otherwise would silently change the network."""
    cfg = tmp_path / "bad.yaml"
    base = Path(DEFAULT_CONFIG).resolve()
    cfg.write_text(f'_BASE_: "{base}"\nMODEL:\n  RESNETS:\n    STRIDE_IN_1X1: True\n')
    src = tmp_path / "in.pth"
    torch.save(wrap("torchvision", r50, "resnet50"), src)
    with pytest.raises(ValidationError, match="STRIDE_IN_1X1"):
        to_detectron2(src, tmp_path / "out.pkl", config_file=cfg)
    assert not (tmp_path / "out.pkl").exists()
