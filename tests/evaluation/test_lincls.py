"""Linear classification and the supervised baseline on a tiny image folder (ResNet-18, 16 px, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from moco_d2.core.backbone import load_resnet_state
from moco_d2.core.config import load_config
from moco_d2.core.distributed import init_distributed
from moco_d2.core.errors import UserError
from moco_d2.evaluation.lincls import (
    SanityCheckError,
    build_model,
    lincls_defaults,
    lr_at,
    main,
    sanity_check,
    train,
)

CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def make_image_folder(root: Path, n_train: int = 6, n_val: int = 3, size: int = 20) -> Path:
    """train/ and val/ with CLASSES colour-coded classes; every third image is grayscale (mode L)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), np.float32)
                base[..., c] = 200
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                pil = Image.fromarray(img)
                (pil.convert("L") if i % 3 == 2 else pil).save(d / f"{i}.png")
    return root


def moco_checkpoint(path: Path, arch: str = "resnet18", official: bool = False, seed: int = 0) -> dict:
    """A MoCo v2 checkpoint in our format (or the official one); returns the query-encoder backbone."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)()
    backbone = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    for k, v in backbone.items():  # pretrained-looking BN statistics, far from the (0, 1) init
        if k.endswith("running_mean"):
            v.uniform_(-0.5, 0.5)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2.0)
        elif k.endswith("num_batches_tracked"):
            v.fill_(1234)
    dim = net.fc.in_features
    head = {"fc.0.weight": torch.randn(dim, dim), "fc.0.bias": torch.randn(dim)}
    head |= {"fc.2.weight": torch.randn(8, dim), "fc.2.bias": torch.randn(8)}
    sd = {}
    for enc in ("encoder_q", "encoder_k"):
        sd |= {f"module.{enc}.{k}": v.clone() for k, v in (backbone | head).items()}
        if enc == "encoder_k":  # the key encoder differs: it must not be the one loaded
            sd |= {f"module.{enc}.{k}": v + 1 for k, v in backbone.items() if v.is_floating_point()}
    sd |= {"module.queue": torch.randn(8, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    ckpt = {"epoch": 2, "arch": arch, "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}
    if not official:
        ckpt |= {"iteration": 10, "epoch_step": 0, "config": "", "kind": "moco"}
    torch.save(ckpt, path)
    return backbone


def opts(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "DATA.ROOT": str(data),
        "OUTPUT_DIR": str(out),
        "MODEL.ARCH": "resnet18",
        "DATA.CROP_SIZE": 16,
        "DATA.RESIZE": 18,
        "DATA.NUM_WORKERS": 0,
        "SOLVER.BATCH_SIZE": 6,
        "SOLVER.EPOCHS": 2,
        "SOLVER.STEPS": "[1]",
        "TRAIN.DEVICE": "cpu",
        "LOG.PERIOD": 1,
        "LOG.TENSORBOARD": False,
    } | extra
    return [str(x) for kv in base.items() for x in kv]


def _cfg(argv: list[str]):
    return load_config(lincls_defaults(), "configs/lincls/lincls_in1k.yaml", argv)


def _backbone(sd: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in sd.items() if not k.startswith(("module.fc.", "fc."))}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder"))


def test_linear_run_killed_and_resumed_trains_only_fc_and_passes_sanity_check(data: Path, tmp_path: Path):
    pretrained = moco_checkpoint(tmp_path / "moco.pth")
    out = tmp_path / "out"
    argv = ["--config-file", "configs/lincls/lincls_in1k.yaml"]  # has RESUME auto
    argv += opts(data, out, **{"MODEL.WEIGHTS": tmp_path / "moco.pth"})
    cfg = _cfg(argv[2:])
    torch.manual_seed(cfg.SEED)  # the same fc init as the run
    initial, _, _ = build_model(cfg, CLASSES)
    initial_fc = {k: v.clone() for k, v in initial.state_dict().items() if k.startswith("fc.")}

    # 6 train images x 3 classes / batch 6 = 3 iterations per epoch; killed in the middle of epoch 2.
    assert main([*argv, "TRAIN.MAX_ITERS", "4"]) == {}
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint_0001.pth", "model_best.pth"]
    assert not (out / "results.json").exists()
    first = torch.load(out / "checkpoint_0001.pth", weights_only=True)
    with pytest.raises(SystemExit) as refused:  # a fresh run there would rotate the checkpoints away
        main([*argv, "RESUME", ""])
    assert refused.value.code == 2 and sorted(p.name for p in out.glob("*.pth")) == [
        "checkpoint_0001.pth",
        "model_best.pth",
    ]
    results = main(argv)  # resumes from checkpoint_0001.pth

    assert json.loads((out / "results.json").read_text()) == results
    assert results["sanity_check"] == "passed" and results["kind"] == "lincls" and results["epochs"] == 2
    assert results["checkpoint"] == str(tmp_path / "moco.pth")
    assert 0 <= results["top1"] <= results["top5"] == 100.0  # 3 classes: top-5 always hits
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["kind"] == "lincls" and final["epoch"] == 2 and final["arch"] == "resnet18"
    assert all(k.startswith("module.") for k in final["state_dict"])
    backbone = _backbone(final["state_dict"])
    assert backbone.keys() == pretrained.keys()
    for k, v in pretrained.items():  # weights AND BN running statistics untouched
        assert torch.equal(backbone[k], v), k
    for k, v in initial_fc.items():
        assert not torch.equal(first["state_dict"][f"module.{k}"], v), f"{k} did not train in epoch 1"
        assert not torch.equal(final["state_dict"][f"module.{k}"], first["state_dict"][f"module.{k}"]), k
    # The resumed run is bit-identical to an uninterrupted one (data order + augmentation seeded per epoch).
    straight = main([*argv, "OUTPUT_DIR", str(tmp_path / "straight")])
    assert straight == results
    ref = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    assert torch.equal(ref["state_dict"]["module.fc.weight"], final["state_dict"]["module.fc.weight"])
    # Only fc reached the optimizer.
    assert len(final["optimizer"]["param_groups"][0]["params"]) == 2
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3.0)  # 30 x 0.1 after STEPS [1]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/epoch"] for r in lines if "val/top1" in r] == [1.0, 2.0]
    assert any("train/loss" in r for r in lines)

    # Resuming on other weights in the same OUTPUT_DIR is refused.
    moco_checkpoint(tmp_path / "other.pth", seed=5)
    with pytest.raises(UserError, match="continues a run on MODEL.WEIGHTS"):
        train(
            _cfg(opts(data, out, **{"MODEL.WEIGHTS": tmp_path / "other.pth", "RESUME": "auto"})),
            init_distributed("cpu"),
        )


def test_sanity_check_fails_when_a_backbone_tensor_changes(tmp_path: Path):
    moco_checkpoint(tmp_path / "moco.pth")
    cfg = _cfg(opts(tmp_path, tmp_path / "out", **{"MODEL.WEIGHTS": tmp_path / "moco.pth"}))
    model, pretrained, _ = build_model(cfg, CLASSES)
    sanity_check(model, pretrained)  # freshly loaded: passes
    model.fc.weight.data.add_(1.0)  # fc may change
    sanity_check(model, pretrained)
    with torch.no_grad():  # one forward in train mode moves BN running statistics: must be caught
        model.train()(torch.randn(2, 3, 16, 16))
    with pytest.raises(SanityCheckError, match="running_mean|running_var|num_batches"):
        sanity_check(model, pretrained)
    model, pretrained, _ = build_model(cfg, CLASSES)
    model.layer3[1].conv2.weight.data[0, 0, 0, 0] += 1e-6
    with pytest.raises(SanityCheckError, match=r"layer3\.1\.conv2\.weight"):
        sanity_check(model, pretrained)


def test_frozen_model_has_only_fc_trainable_and_official_init(tmp_path: Path):
    moco_checkpoint(tmp_path / "moco.pth")
    cfg = _cfg(opts(tmp_path, tmp_path / "out", **{"MODEL.WEIGHTS": tmp_path / "moco.pth"}))
    model, _, _ = build_model(cfg, 1000)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert model.fc.bias.abs().sum() == 0
    assert abs(model.fc.weight.std().item() - 0.01) < 5e-4 and abs(model.fc.weight.mean().item()) < 1e-4


def test_official_and_our_checkpoints_load_the_query_encoder(tmp_path: Path):
    ours = moco_checkpoint(tmp_path / "ours.pth", seed=1)
    official = moco_checkpoint(tmp_path / "official.pth", official=True, seed=2)
    for path, expected in ((tmp_path / "ours.pth", ours), (tmp_path / "official.pth", official)):
        cfg = _cfg(opts(tmp_path, tmp_path / "out", **{"MODEL.WEIGHTS": path}))
        model, pretrained, source = build_model(cfg, CLASSES)
        assert ("official" in source.split(":")[0]) == (path.name == "official.pth")
        sd = model.state_dict()
        for k, v in expected.items():
            assert torch.equal(sd[k], v) and torch.equal(pretrained[k], v), k


def test_bad_checkpoints_give_one_line_errors(tmp_path: Path, capsys):
    torch.save({"state_dict": {"module.head.weight": torch.zeros(2)}, "epoch": 1}, tmp_path / "noenc.pth")
    cfg = _cfg(opts(tmp_path, tmp_path / "out", **{"MODEL.WEIGHTS": tmp_path / "noenc.pth"}))
    with pytest.raises(UserError, match="holds no ResNet encoder weights"):
        build_model(cfg, CLASSES)
    moco_checkpoint(tmp_path / "r18.pth")
    cfg = _cfg(
        opts(tmp_path, tmp_path / "out", **{"MODEL.WEIGHTS": tmp_path / "r18.pth", "MODEL.ARCH": "resnet34"})
    )
    with pytest.raises(UserError, match="holds a resnet18 backbone but MODEL.ARCH is 'resnet34'"):
        build_model(cfg, CLASSES)
    with pytest.raises(UserError, match="MODEL.WEIGHTS is empty"):
        build_model(_cfg(opts(tmp_path, tmp_path / "out")), CLASSES)
    with pytest.raises(SystemExit) as exc:  # through the CLI: exit 2, one line, no traceback
        main(
            ["--config-file", "configs/lincls/lincls_in1k.yaml", "MODEL.WEIGHTS", str(tmp_path / "noenc.pth")]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "noenc.pth" in err


def test_supervised_mode_trains_backbone_and_checkpoint_is_readable(data: Path, tmp_path: Path):
    out = tmp_path / "sup"
    argv = opts(data, out, **{"MODEL.FREEZE_BACKBONE": False, "SOLVER.EPOCHS": 1, "SOLVER.BASE_LR": 0.1})
    cfg = _cfg(argv)
    torch.manual_seed(cfg.SEED)
    initial, pretrained, _ = build_model(cfg, CLASSES)
    assert pretrained is None and all(p.requires_grad for p in initial.parameters())
    results = main(["--config-file", "configs/lincls/lincls_in1k.yaml", *argv])
    assert results["kind"] == "supervised" and results["sanity_check"].startswith("not applicable")
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert ckpt["kind"] == "supervised"
    trained = _backbone(ckpt["state_dict"])
    init = initial.state_dict()
    assert not torch.equal(trained["conv1.weight"], init["conv1.weight"])
    assert not torch.equal(trained["layer4.1.bn2.running_mean"], init["layer4.1.bn2.running_mean"])
    state = load_resnet_state(out / "model_final.pth")
    assert state.arch == "resnet18" and state.meta["kind"] == "supervised"
    assert state.state_dict.keys() == trained.keys()
    for k, v in trained.items():
        assert torch.equal(state.state_dict[k], v)


def test_lr_schedule_is_the_official_step_schedule():
    cfg = load_config(lincls_defaults(), "configs/lincls/lincls_in1k.yaml", [])
    assert [lr_at(cfg, e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    assert cfg.SOLVER.BATCH_SIZE == 256 and cfg.SOLVER.MOMENTUM == 0.9 and cfg.SOLVER.WEIGHT_DECAY == 0
    assert (cfg.DATA.CROP_SIZE, cfg.DATA.RESIZE, cfg.SOLVER.EPOCHS) == (224, 256, 100)
