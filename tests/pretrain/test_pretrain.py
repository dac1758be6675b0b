"""pretrain/train.py end to end on the CPU: exact resume after a kill, checkpoint formats, errors."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from pretrain_utils import free_port, make_image_folder

from moco_d2.core.config import load_config, pretrain_defaults
from moco_d2.core.distributed import cleanup, init_distributed
from moco_d2.core.errors import UserError
from moco_d2.core.io import load_checkpoint
from moco_d2.core.metrics import read_metrics
from pretrain.train import (
    NonFiniteLossError,
    build_model,
    build_optimizer,
    learning_rate,
    load_training_state,
    main,
    train,
    train_step,
)

TINY = [
    "MODEL.ARCH", "resnet18", "MODEL.DIM", "16", "MODEL.K", "16", "MODEL.BN_SPLITS", "2",
    "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "2", "AUG.SIZE", "32", "DATA.NUM_WORKERS", "0",
    "LOG.TENSORBOARD", "False", "LOG.PERIOD", "1", "CHECKPOINT.KEEP_LAST", "2",
]  # fmt: skip


def tiny_cfg(data: Path, out: Path, *opts: str):
    return load_config(
        pretrain_defaults(), None, [*TINY, "DATA.ROOT", str(data), "OUTPUT_DIR", str(out), *opts]
    )


def run(data: Path, out: Path, *opts: str) -> dict:
    return train(tiny_cfg(data, out, *opts), init_distributed("cpu"))


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["iteration"] == b["iteration"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for i, s in opt_a["state"].items():
        assert torch.equal(s["momentum_buffer"], opt_b["state"][i]["momentum_buffer"])


@pytest.fixture
def moco_log(caplog):
    """Capture the "moco" logger even after setup_logging() turned its propagation off."""
    log = logging.getLogger("moco")
    old_level = log.level
    log.addHandler(caplog.handler)
    log.setLevel(logging.INFO)
    yield caplog
    log.removeHandler(caplog.handler)
    log.setLevel(old_level)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_image_folder(root / "train", classes=2, per_class=6, size=40)  # 12 images: 3 steps/epoch
    (root / "train" / "class_1" / "img_5.png").write_bytes(b"corrupt")  # skipped with a warning
    return root


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(data, out, "DATA.MAX_BAD_FRACTION", "0.1")
    assert result["iteration"] == 6 and not result["stopped"] and math.isfinite(result["loss"])
    return out


def test_kill_mid_epoch_then_resume_is_bit_identical(data, uninterrupted, tmp_path, moco_log):
    opts = ["DATA.MAX_BAD_FRACTION", "0.1", "CHECKPOINT.PERIOD_ITERS", "4"]
    # "kill" after iteration 5: the newest checkpoint is the mid-epoch one of iteration 4 (epoch 1, step 1)
    killed = run(data, tmp_path, *opts, "TRAIN.MAX_ITERS", "5")
    assert killed["stopped"] and killed["iteration"] == 5
    names = sorted(p.name for p in tmp_path.glob("checkpoint_*.pth"))
    assert names == ["checkpoint_0001.pth", "checkpoint_0001_iter0000004.pth"]  # KEEP_LAST 2
    assert "img_5.png" in moco_log.text  # the corrupt file was named
    torn = tmp_path / "checkpoint_0001_iter0000005.pth"  # newest, but torn: RESUME auto must skip it
    torn.write_bytes((tmp_path / "checkpoint_0001_iter0000004.pth").read_bytes()[:5000])
    resumed = run(data, tmp_path, *opts, "RESUME", "auto")
    assert resumed["iteration"] == 6 and "iteration 4" in moco_log.text
    a = load_checkpoint(uninterrupted / "model_final.pth")
    b = load_checkpoint(tmp_path / "model_final.pth")
    assert_same_training_state(a, b)  # weights, queue, queue_ptr, BN stats, SGD momentum
    assert a["state_dict"]["module.queue_ptr"].item() == 6 * 4 % 16


def _train_rank(rank: int, port: int, data: str, out: str, opts: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # see test_two_processes_with_kill_and_resume_match_one_process
    info = init_distributed("cpu")
    try:
        train(tiny_cfg(Path(data), Path(out), *opts), info)
    finally:
        cleanup()


def test_two_processes_with_kill_and_resume_match_one_process(tmp_path):
    """The whole loop under env:// with 2 gloo ranks, killed and resumed (RESUME auto), logs the same
    losses and ends with the same weights and queue as one uninterrupted process with 2 split-BN groups:
    the global batches, BN groups and permutations are the same.

    The whole run is float64 (model, queue and the reference pipeline's views follow the default dtype):
    the claim is algorithmic equality, and in float32 the two layouts' different summation orders are
    amplified by 2-image BN groups into ~1e-3 loss differences that vary with the CPU's kernel set.
    In float64 the same amplification leaves them below 1e-9."""
    data = make_image_folder(tmp_path / "data" / "train", classes=2, per_class=8, size=72).parent
    opts = ["SOLVER.BATCH_SIZE", "8", "AUG.SIZE", "64", "CHECKPOINT.PERIOD_ITERS", "1"]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        run(data, tmp_path / "one", *opts)
    finally:
        torch.set_default_dtype(default_dtype)
    two = str(tmp_path / "two")
    mp.spawn(_train_rank, args=(free_port(), str(data), two, [*opts, "TRAIN.MAX_ITERS", "3"]), nprocs=2)
    assert not (tmp_path / "two" / "model_final.pth").exists()
    mp.spawn(_train_rank, args=(free_port(), str(data), two, [*opts, "RESUME", "auto"]), nprocs=2)
    one_losses = [r["train/loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    two_losses = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")}
    assert len(one_losses) == 4 and sorted(two_losses) == [1, 2, 3, 4]
    # metrics.jsonl logs the loss through float32 (stats are all-reduced as float32): one float32 rounding
    # of equal float64 losses can land one ulp apart, 2^-23 relative
    assert [two_losses[s] for s in (1, 2, 3, 4)] == pytest.approx(one_losses, rel=2.5e-7)
    a = load_checkpoint(tmp_path / "one" / "model_final.pth")["state_dict"]
    b = load_checkpoint(tmp_path / "two" / "model_final.pth")["state_dict"]
    assert a.keys() == b.keys() and torch.equal(a["module.queue_ptr"], b["module.queue_ptr"])
    for k in a:
        if "running" not in k and "num_batches" not in k:  # BN running stats: rank 0's group vs the mean
            assert b[k].dtype == a[k].dtype and a[k].dtype in (torch.float64, torch.int64), k
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-9, msg=k)


def test_checkpoint_format(uninterrupted):
    ckpt = torch.load(uninterrupted / "checkpoint_0002.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18" and ckpt["kind"] == "moco"
    assert ckpt["iteration"] == 6 and ckpt["epoch_step"] == 0 and "MODEL:" in ckpt["config"]
    sd = ckpt["state_dict"]
    assert sd["module.queue"].shape == (16, 16) and sd["module.queue_ptr"].shape == (1,)
    assert {
        "module.encoder_q.conv1.weight",
        "module.encoder_q.fc.0.weight",
        "module.encoder_q.fc.2.bias",
    } <= set(sd)
    assert {"module.encoder_k.layer4.1.bn2.running_mean", "module.encoder_k.fc.2.weight"} <= set(sd)
    torch.testing.assert_close(sd["module.queue"].norm(dim=0), torch.ones(16))
    lines = (uninterrupted / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"train/acc5"' in lines[0] and '"train/data_time_frac"' in lines[0]


def test_official_checkpoint_resumes(data, tmp_path):
    """A checkpoint written like the official main_moco.py (plain dict, module. prefix, no extras)."""
    cfg = tiny_cfg(data, tmp_path, "SOLVER.EPOCHS", "2")
    torch.manual_seed(1)
    moco = build_model(cfg, 1)
    optimizer = build_optimizer(cfg, moco, torch.device("cpu"))
    im = torch.randn(4, 3, 32, 32)
    train_step(moco, optimizer, im, im.flip(-1), torch.Generator().manual_seed(0))
    official = {
        "epoch": 1,
        "arch": "resnet18",
        "state_dict": {f"module.{k}": v.clone() for k, v in moco.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    path = tmp_path / "checkpoint_0000.pth.tar"
    torch.save(official, path)
    fresh = build_model(cfg, 1)
    fresh_opt = build_optimizer(cfg, fresh, torch.device("cpu"))
    assert load_training_state(path, cfg, fresh, fresh_opt, None, steps_per_epoch=3) == (1, 0, 3)
    for k, v in moco.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["momentum_buffer"],
        optimizer.state_dict()["state"][0]["momentum_buffer"],
    )
    result = run(data, tmp_path / "out", "RESUME", str(path), "DATA.MAX_BAD_FRACTION", "0.1")
    assert result["epoch"] == 2 and result["iteration"] == 6  # continued with epoch 1 only
    torch.save({**official, "kind": "lincls"}, tmp_path / "lincls.pth")
    with pytest.raises(UserError, match="'lincls' checkpoint, not a MoCo pretraining one"):
        load_training_state(tmp_path / "lincls.pth", cfg, fresh, fresh_opt, None, 3)
    with pytest.raises(UserError, match="MODEL.ARCH is resnet34"):
        load_training_state(
            path, tiny_cfg(data, tmp_path, "MODEL.ARCH", "resnet34"), fresh, fresh_opt, None, 3
        )
    with pytest.raises(UserError, match=r"queue has shape \(16, 16\), the model has \(16, 32\)"):
        wrong_k = tiny_cfg(data, tmp_path, "MODEL.K", "32")
        load_training_state(path, wrong_k, build_model(wrong_k, 1), fresh_opt, None, 3)


def test_non_finite_loss_stops_before_the_update(data, tmp_path, capsys):
    cfg = tiny_cfg(data, tmp_path)
    moco = build_model(cfg, 1)
    optimizer = build_optimizer(cfg, moco, torch.device("cpu"))
    with torch.no_grad():
        moco.encoder_q.fc[2].weight.fill_(float("nan"))
    before = {k: v.detach().clone() for k, v in moco.encoder_q.named_parameters()}
    im = torch.randn(4, 3, 32, 32)
    with pytest.raises(NonFiniteLossError, match="loss is nan"):
        train_step(moco, optimizer, im, im, torch.Generator().manual_seed(0))
    after = dict(moco.encoder_q.named_parameters())  # no optimizer step happened
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)
    # through the CLI: the message names the iteration; the checkpoint we resumed from stays loadable
    state = {
        "epoch": 1, "arch": "resnet18", "kind": "moco", "iteration": 3, "epoch_step": 0,
        "state_dict": {f"module.{k}": v for k, v in moco.state_dict().items()},
    }  # fmt: skip
    torch.save(state, tmp_path / "checkpoint_0001.pth")
    argv = [
        *TINY,
        "DATA.ROOT",
        str(data),
        "OUTPUT_DIR",
        str(tmp_path),
        "RESUME",
        "auto",
        "DATA.MAX_BAD_FRACTION",
        "0.1",
    ]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: loss is nan at iteration 3 (epoch 1, step 0)" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint_0001.pth"]
    load_checkpoint(tmp_path / "checkpoint_0001.pth")


@pytest.mark.parametrize(
    ("layout", "opts", "message"),
    [
        ("missing", [], "no training images at"),
        ("empty_class", [], "class_2' has no images"),
        ("no_images", [], "has no images"),
        ("ok", ["MODEL.K", "18"], "MODEL.K=18 must be a multiple of the global batch SOLVER.BATCH_SIZE=4"),
        ("ok", ["MODEL.BN_SPLITS", "1"], "Shuffle-BN needs at least 2 batch-norm groups"),
        ("ok", ["MODEL.BN_SPLITS", "3"], "not divisible by MODEL.BN_SPLITS=3"),
        ("ok", ["MODEL.ARCH", "vgg16"], "not a torchvision ResNet"),
        ("ok", ["MODEL.T", "0.0"], "need MODEL.T > 0"),
        ("ok", ["SOLVER.BATCH_SIZE", "16"], "fewer than one global batch"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, capsys, layout, opts, message):
    if layout == "missing":
        (tmp_path / "val").mkdir()
    elif layout == "empty_class":
        make_image_folder(tmp_path / "train", classes=2, per_class=2)
        (tmp_path / "train" / "class_2").mkdir()
    elif layout == "no_images":
        (tmp_path / "train" / "a").mkdir(parents=True)
    else:
        make_image_folder(tmp_path / "train", classes=2, per_class=3)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "DATA.ROOT", str(tmp_path), "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_fresh_run_never_overwrites_another_runs_checkpoints(data, uninterrupted, tmp_path, capsys):
    """Forgetting RESUME auto must not let the new run's rotation delete the old run's checkpoints."""
    out = tmp_path / "run"
    out.mkdir()
    for p in uninterrupted.glob("*"):
        (out / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "DATA.ROOT", str(data), "OUTPUT_DIR", str(out), "DATA.MAX_BAD_FRACTION", "0.1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: OUTPUT_DIR {str(out)!r} already holds a run's checkpoints (newest checkpoint_0002.pth); "
        "continue it with RESUME auto, or start the new run in another OUTPUT_DIR"
    )
    assert {name: (out / name).read_bytes() for name in before} == before  # config.yaml untouched too


@pytest.mark.parametrize(
    ("signal_at_image", "stopped_at", "newest"),
    [(6, 2, "checkpoint_0000_iter0000002.pth"), (10, 3, "checkpoint_0001.pth")],
)
def test_sigterm_stops_cleanly_and_resume_is_bit_identical(
    data, uninterrupted, tmp_path, monkeypatch, signal_at_image, stopped_at, newest
):
    """A preemption notice mid-epoch (or at an epoch's last step): checkpoint, stop, resume exactly."""
    import pretrain.train as train_module

    real = train_module.build_pretrain_transform
    calls = [0]

    def signalling_transform(*args, **kwargs):
        transform = real(*args, **kwargs)

        def apply(img):
            calls[0] += 1
            if (
                calls[0] == signal_at_image
            ):  # while loading the batch of iteration (signal_at_image - 1) // 4 + 1
                signal.raise_signal(signal.SIGTERM)
            return transform(img)

        return apply

    handler_before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train_module, "build_pretrain_transform", signalling_transform)
    stopped = run(data, tmp_path, "DATA.MAX_BAD_FRACTION", "0.1")
    assert stopped["stopped"] and stopped["signal"] == signal.SIGTERM and stopped["iteration"] == stopped_at
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the trainer's handler is gone again
    assert max(tmp_path.glob("checkpoint_*.pth"), key=os.path.getmtime).name == newest
    monkeypatch.undo()
    resumed = run(data, tmp_path, "DATA.MAX_BAD_FRACTION", "0.1", "RESUME", "auto")
    assert resumed["iteration"] == 6 and not resumed["stopped"]
    a = load_checkpoint(uninterrupted / "model_final.pth")
    b = load_checkpoint(tmp_path / "model_final.pth")
    assert_same_training_state(a, b)


def test_sigterm_to_the_whole_job_with_loader_workers(data, tmp_path):
    """As a cluster does it: SIGTERM to every process (trainer and its loader worker). Exit 143 after a
    clean checkpoint; RESUME auto continues from the iteration where it stopped.

    Driven by events, not by speed: the signal is sent once metrics.jsonl shows the loop running, the
    schedule (40 epochs) is far longer than any machine needs to react, and the resumed run stops itself
    three iterations later (TRAIN.MAX_ITERS) instead of finishing the schedule. The timeouts are only
    there to fail a hung process; a quiet 2-core machine needs ~10 s for each phase.
    """
    root = Path(__file__).resolve().parents[2]
    argv = [
        sys.executable,
        "-m",
        "pretrain.train",
        *TINY,
        "DATA.ROOT",
        str(data),
        "OUTPUT_DIR",
        str(tmp_path),
    ]
    argv += ["DATA.MAX_BAD_FRACTION", "0.1", "DATA.NUM_WORKERS", "1", "SOLVER.EPOCHS", "40"]
    proc = subprocess.Popen(
        argv, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    log = (tmp_path / "log.txt").read_text()
    assert "stopped by SIGTERM after iteration" in log
    stopped_at = load_checkpoint(max(tmp_path.glob("checkpoint_*.pth"), key=os.path.getmtime))["iteration"]
    assert stopped_at == len(read_metrics(metrics)) >= 4  # the checkpoint holds every logged iteration
    resume = [*argv, "RESUME", "auto", "TRAIN.MAX_ITERS", str(stopped_at + 3)]
    resumed = subprocess.run(resume, cwd=root, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"iteration {stopped_at}" in (tmp_path / "log.txt").read_text()
    steps = [r["step"] for r in read_metrics(metrics)]
    assert steps == list(range(1, stopped_at + 4))  # continued where it stopped, nothing re-run or skipped


def test_too_many_corrupt_images_stops(tmp_path, capsys):
    make_image_folder(tmp_path / "train", classes=2, per_class=4)
    for name in ("class_0/img_0.png", "class_1/img_2.png"):
        (tmp_path / "train" / name).write_bytes(b"bad")
    with pytest.raises(SystemExit):
        main(
            [
                *TINY,
                "DATA.ROOT",
                str(tmp_path),
                "OUTPUT_DIR",
                str(tmp_path / "out"),
                "DATA.MAX_BAD_FRACTION",
                "0.2",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert "error: 2 of 8 images" in err and "DATA.MAX_BAD_FRACTION=0.2" in err and "\n" not in err


def test_learning_rate_schedules():
    cfg = load_config(pretrain_defaults(), None, ["SOLVER.BATCH_SIZE", "512"])
    assert learning_rate(cfg, 0) == pytest.approx(0.06)
    assert learning_rate(cfg, 100) == pytest.approx(0.03)
    assert learning_rate(cfg, 150) == pytest.approx(0.06 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    step = load_config(pretrain_defaults(), None, ["SOLVER.SCHEDULE", "step"])
    assert [learning_rate(step, e) for e in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003]
    )
