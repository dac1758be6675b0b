"""Issue 16, pretraining's failure paths: errors with loader workers exit promptly, a full disk is one line,
a torn checkpoint never displaces a good one, stale temp files go, metrics.jsonl never repeats a step,
nothing is written through a planted symlink, impossible settings are refused up front."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pretrain_utils import make_image_folder

from moco_d2.core.io import load_checkpoint
from moco_d2.core.metrics import read_metrics
from pretrain.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "MODEL.ARCH", "resnet18", "MODEL.DIM", "16", "MODEL.K", "16", "MODEL.BN_SPLITS", "2",
    "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "2", "AUG.SIZE", "32", "DATA.NUM_WORKERS", "0",
    "LOG.TENSORBOARD", "False", "LOG.PERIOD", "1", "CHECKPOINT.KEEP_LAST", "2",
]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_image_folder(root / "train", classes=2, per_class=6, size=40)  # 12 images: 3 steps/epoch
    return root


def argv(data: Path, out: Path, *opts: str) -> list[str]:
    return [*TINY, "DATA.ROOT", str(data), "OUTPUT_DIR", str(out), *opts]


def one_line_error(capsys, *opts: str, data: Path, out: Path) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv(data, out, *opts))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory) -> Path:
    """A finished first epoch: checkpoint_0001.pth (and model_final.pth) of a 1-epoch schedule."""
    out = tmp_path_factory.mktemp("one_epoch")
    main(argv(data, out, "SOLVER.EPOCHS", "1"))
    return out


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the child was started with start_new_session=True)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            found.append(int(entry.name))
    return found


def _disk_full() -> None:  # preexec_fn: a 10 MB file size limit, EFBIG instead of SIGXFSZ (inherited by exec)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000_000, resource.RLIM_INFINITY))


INJECT = """
import sys
import pretrain.train as t
real, calls = t.train_step, [0]
def failing_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        raise RuntimeError("injected bug")
    return real(*args, **kwargs)
t.train_step = failing_step
t.main(sys.argv[1:])
"""


@pytest.mark.parametrize("failure", ["disk_full", "runtime_error"])
def test_error_with_loader_workers_exits_promptly(data, one_epoch, tmp_path, failure):
    """Before the fix both hung forever after the traceback: the workers ignore SIGTERM and the
    interpreter's exit handler SIGTERMs and joins them. Now: a prompt non-zero exit, no process left."""
    out = tmp_path / "run"
    out.mkdir()
    previous = (one_epoch / "checkpoint_0001.pth").read_bytes()
    (out / "checkpoint_0001.pth").write_bytes(previous)
    opts = argv(data, out, "RESUME", "auto", "SOLVER.EPOCHS", "3", "DATA.NUM_WORKERS", "2")
    if failure == "disk_full":
        cmd, preexec = [sys.executable, "-m", "pretrain.train", *opts], _disk_full
    else:
        cmd, preexec = [sys.executable, "-c", INJECT, *opts], None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=preexec,
    )
    try:
        _, err = proc.communicate(
            timeout=int(os.environ.get("HANG_TIMEOUT", "180"))
        )  # a quiet 2-core machine needs ~20 s
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the process hung after the error")
    deadline = time.monotonic() + 10
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_processes(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    assert proc.returncode != 0
    if failure == "disk_full":
        assert proc.returncode == 2, err[-3000:]
        lines = err.strip().splitlines()
        assert "Traceback" not in err and lines[-1].startswith("error: cannot write checkpoint "), err[-3000:]
        assert "File too large" in lines[-1] and "checkpoint_0002.pth" in lines[-1]
        assert (out / "checkpoint_0001.pth").read_bytes() == previous  # the previous checkpoint is intact
        assert not list(out.glob(".*.tmp"))  # and no temp file is left
    else:
        assert "RuntimeError: injected bug" in err


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(data, one_epoch, tmp_path, capsys):
    """In process (no workers): torch.save's opaque "unexpected pos" RuntimeError becomes the OS's reason."""
    previous = (one_epoch / "checkpoint_0001.pth").read_bytes()
    (tmp_path / "checkpoint_0001.pth").write_bytes(previous)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(previous) // 2, hard))
    try:
        err = one_line_error(capsys, "RESUME", "auto", "SOLVER.EPOCHS", "3", data=data, out=tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert err.startswith(
        f"error: cannot write checkpoint {str(tmp_path / 'checkpoint_0002.pth')!r}: File too large"
    )
    assert (tmp_path / "checkpoint_0001.pth").read_bytes() == previous
    assert not list(tmp_path.glob(".*.tmp"))


def test_torn_only_checkpoint_never_displaces_new_ones(data, tmp_path):
    """The only checkpoint is torn, RESUME auto, KEEP_LAST 1: before, rotation kept the torn newest name
    and deleted each new checkpoint right after saving it."""
    torn = tmp_path / "checkpoint_0009.pth"
    torn.write_bytes(b"PK\x03\x04 torn by a kill")
    main(argv(data, tmp_path, "RESUME", "auto", "CHECKPOINT.KEEP_LAST", "1"))
    assert load_checkpoint(tmp_path / "checkpoint_0002.pth")["iteration"] == 6
    assert not (tmp_path / "checkpoint_0001.pth").exists()  # rotated as usual
    log = (tmp_path / "log.txt").read_text()
    assert "skipping checkpoint_0009.pth" in log and "truncated or corrupt" in log  # the skip is mentioned


def test_stale_temp_files_are_removed_at_start(data, one_epoch, tmp_path):
    for name in ("checkpoint_0001.pth", "metrics.jsonl"):
        (tmp_path / name).write_bytes((one_epoch / name).read_bytes())
    stale = [
        ".checkpoint_0002.pth.k3j4h5.tmp",
        ".checkpoint_0001_iter0000004.pth.x.tmp",
        ".model_final.pth.q.tmp",
    ]
    for name in stale:
        (tmp_path / name).write_bytes(b"\0" * 1000)
    (tmp_path / ".notes.tmp").write_text("not ours")
    main(argv(data, tmp_path, "RESUME", "auto", "TRAIN.MAX_ITERS", "4"))
    assert not any((tmp_path / name).exists() for name in stale)
    assert (tmp_path / ".notes.tmp").exists()
    assert "a temp file left by an interrupted save" in (tmp_path / "log.txt").read_text()


def test_metrics_have_no_duplicate_steps_after_resume(data, tmp_path):
    opts = ["CHECKPOINT.PERIOD_ITERS", "4"]
    main(argv(data, tmp_path, *opts, "TRAIN.MAX_ITERS", "5"))  # "killed" after 5, newest checkpoint at 4
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    main(argv(data, tmp_path, *opts, "RESUME", "auto"))
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # as the uninterrupted run (2 epochs x 3 steps, LOG.PERIOD 1)


def test_config_yaml_replaces_a_planted_symlink(data, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").symlink_to(victim)
    main(argv(data, out, "TRAIN.MAX_ITERS", "1"))
    assert victim.read_text() == "precious"
    assert not (out / "config.yaml").is_symlink() and "resnet18" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("name", ["log.txt", "metrics.jsonl"])
def test_logs_never_append_through_a_symlink(data, tmp_path, capsys, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    err = one_line_error(capsys, "TRAIN.MAX_ITERS", "1", data=data, out=out)
    assert f"{str(out / name)!r} is a symlink; refusing to write through it" in err
    assert victim.read_text() == "precious"


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["MODEL.K", "0"], "MODEL.K=0: the queue needs a positive size"),
        (["DATA.NUM_WORKERS", "-1"], "DATA.NUM_WORKERS must be >= 0"),
        (["TRAIN.DEVICE", "cuda"], "TRAIN.DEVICE is 'cuda' but no CUDA GPU is available"),
        (["TRAIN.DEVICE", "gpu"], "TRAIN.DEVICE must be 'auto', 'cuda' or 'cpu', got 'gpu'"),
        (["SOLVER.BATCH_SIZE", "0"], "SOLVER.BATCH_SIZE=0 must be a positive multiple"),
        (["SOLVER.EPOCHS", "-1"], "SOLVER.EPOCHS must be positive"),
        (["LOG.PERIOD", "0"], "LOG.PERIOD must be >= 1"),
        (["MODEL.DIM", "0"], "MODEL.DIM must be positive"),
        (["CHECKPOINT.PERIOD_ITERS", "-2"], "need CHECKPOINT.PERIOD_ITERS >= 0"),
        (["RESUME", "{tmp}"], "is a directory; expected '', 'auto' or a checkpoint file"),
        (["RESUME", "{tmp}/nope.pth"], "is missing; expected '', 'auto' or a checkpoint file"),
        (["RESUME", "{tmp}/notes.txt"], "is not a PyTorch checkpoint"),
        (["OUTPUT_DIR", "/proc/self/no/out"], "OUTPUT_DIR '/proc/self/no/out' cannot be created"),
        (["OUTPUT_DIR", "{tmp}/notes.txt/out"], "cannot be created: Not a directory"),
    ],
)
def test_bad_settings_are_one_line_errors(data, tmp_path, capsys, opts, message):
    if opts == ["TRAIN.DEVICE", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    opts = [o.replace("{tmp}", str(tmp_path)) for o in opts]
    out = tmp_path / "out"
    err = one_line_error(capsys, *opts, data=data, out=out)
    assert message in err
    if opts[0] != "RESUME" or "notes" not in opts[1]:
        assert not out.exists()  # refused before anything was written
