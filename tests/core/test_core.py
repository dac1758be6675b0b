"""The shared machinery: configs, checkpoints, backbone extraction, metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision

from moco_d2.core.backbone import (
    SOURCE_LINCLS_OFFICIAL,
    SOURCE_MOCO_OFFICIAL,
    SOURCE_MOCO_OURS,
    SOURCE_TORCHVISION,
    extract_resnet_state,
    infer_resnet_arch,
    load_resnet_state,
)
from moco_d2.core.config import load_config, pretrain_defaults
from moco_d2.core.errors import UserError
from moco_d2.core.io import CheckpointManager, load_checkpoint, save_atomic
from moco_d2.core.metrics import AverageMeter, MetricWriter, read_metrics


def test_config_base_chain_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("MODEL:\n  T: 0.07\n  MLP: False\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  EPOCHS: 5\n")
    cfg = load_config(pretrain_defaults(), str(tmp_path / "child.yaml"), ["MODEL.K", "4096"])
    assert (cfg.MODEL.T, cfg.MODEL.MLP, cfg.SOLVER.EPOCHS, cfg.MODEL.K) == (0.07, False, 5, 4096)
    assert cfg.MODEL.M == 0.999  # untouched default


@pytest.mark.parametrize(
    "file_text,opts,match",
    [
        (None, ["MODEL.NOPE", "1"], "unknown key MODEL.NOPE"),
        (None, ["MODEL.K"], "KEY VALUE pairs"),
        ("MODEL:\n  KK: 1\n", [], "unknown key MODEL.KK"),
        ("MODEL: [unclosed\n", [], "not valid YAML"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, file_text, opts, match) -> None:
    path = None
    if file_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(file_text)
    with pytest.raises(UserError, match=match) as info:
        load_config(pretrain_defaults(), str(path) if path else None, opts)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(pretrain_defaults(), str(tmp_path / "nope.yaml"), [])


def test_save_atomic_keeps_old_file_when_save_fails(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    save_atomic({"v": torch.tensor([1.0])}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"v": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path)["v"], torch.tensor([1.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]  # no temp file left behind


def test_checkpoint_manager_rotation_order_and_fallback(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    names = [mgr.name_for(0, 5, 5), mgr.name_for(1), mgr.name_for(1, 2, 12), mgr.name_for(2)]
    for i, name in enumerate(names):
        mgr.save({"i": i}, name)
    assert [p.name for p in mgr.checkpoints()] == names[1:]
    (tmp_path / mgr.name_for(3)).write_bytes(b"torn write")
    assert mgr.latest_valid() == tmp_path / names[-1]


def test_load_checkpoint_refuses_code_execution(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refusing"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_load_checkpoint_truncated_and_garbage(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(100)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"hello")
    for name in ("cut.pth", "junk.pth", "missing.pth"):
        with pytest.raises(UserError, match=name):
            load_checkpoint(tmp_path / name)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2", "resnext50_32x4d"])
def test_infer_arch(arch: str) -> None:
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    assert infer_resnet_arch(model.state_dict()) == arch


def test_backbone_formats(tmp_path: Path) -> None:
    sd = torchvision.models.resnet18().state_dict()
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    head = {"fc.0.weight": torch.zeros(512, 512), "fc.2.weight": torch.zeros(128, 512)}
    enc = {**body, **head}
    formats = {
        SOURCE_MOCO_OURS: {
            "state_dict": {f"module.encoder_q.{k}": v for k, v in enc.items()},
            "kind": "moco",
        },
        SOURCE_MOCO_OFFICIAL: {
            "state_dict": {
                **{f"module.encoder_q.{k}": v for k, v in enc.items()},
                **{f"module.encoder_k.{k}": v + 1 for k, v in enc.items()},
                "module.queue": torch.zeros(128, 8),
            },
            "arch": "resnet18",
        },
        SOURCE_LINCLS_OFFICIAL: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        SOURCE_TORCHVISION: sd,
    }
    for source, ckpt in formats.items():
        torch.save(ckpt, tmp_path / "c.pth")
        state = load_resnet_state(tmp_path / "c.pth")
        assert state.source == source and state.arch == "resnet18"
        assert set(state.state_dict) == set(body)
        assert all(torch.equal(state.state_dict[k], body[k]) for k in body)


def test_backbone_without_encoder_and_arch_mismatch() -> None:
    with pytest.raises(UserError, match="no ResNet encoder weights"):
        extract_resnet_state({"state_dict": {"module.head.weight": torch.zeros(2)}})
    sd = torchvision.models.resnet18().state_dict()
    with pytest.raises(UserError, match="says arch 'resnet50'"):
        extract_resnet_state({"state_dict": sd, "arch": "resnet50"})


def test_meter_and_metric_writer(tmp_path: Path) -> None:
    meter = AverageMeter()
    meter.update(1.0, n=1)
    meter.update(4.0, n=3)
    assert meter.avg == pytest.approx(13 / 4)
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(3, {"loss": 1.5, "lr": 0.1}, prefix="train")
    writer.write(4, {"loss": float("nan")}, prefix="train")
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["step"] == 3 and records[0]["train/loss"] == 1.5
    assert records[1]["train/loss"] == "nan"
    json.dumps(records)
    MetricWriter(tmp_path / "off", enabled=False).write(0, {"a": 1})
    assert not (tmp_path / "off").exists()


def test_launcher_reports_a_workers_mistake_in_one_line(tmp_path: Path) -> None:
    """`make pretrain` on missing data: the worker's one-line error, then one line from the launcher."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "moco_d2.core.launch",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "pretrain.train",
    ]
    cmd += [
        "DATA.ROOT",
        str(tmp_path / "nowhere"),
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        "TRAIN.DEVICE",
        "cpu",
    ]
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: DATA.ROOT: no training images at") and "nowhere" in errors[0]
    assert errors[1] == "error: pretrain.train failed on rank 0 with exit code 2; its own message is above"


def test_launcher_exit_codes() -> None:
    from moco_d2.core.launch import exit_code

    assert (exit_code(2), exit_code(-9), exit_code(0)) == (2, 137, 1)


def test_plot_draws_every_logged_scalar_of_every_run(tmp_path: Path, capsys) -> None:
    from moco_d2.core.plot import load_run, main

    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        records = [
            {"step": 1, "time": 0.0, "train/loss": 8.0 * scale, "train/lr": 0.03, "train/epoch": 0.5},
            {"step": 2, "time": 1.0, "train/loss": float("nan"), "train/lr": 0.03, "train/epoch": 1.0},
            {"step": 2, "knn/top1": 40.0 * scale},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = load_run(tmp_path / "a")
    assert curves == {
        "train/loss": ([1], [8.0]),
        "train/lr": ([1, 2], [0.03, 0.03]),
        "knn/top1": ([2], [40.0]),
    }
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert "3 panels (knn/top1, train/loss, train/lr)" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "empty")])
    assert "has no metrics.jsonl" in capsys.readouterr().err
