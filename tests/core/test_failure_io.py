"""Issue 16, the shared I/O's failure paths: rotation never trusts a torn file, disk-full is one line,
stale temp files go, logs never follow a planted symlink, an impossible OUTPUT_DIR is one line."""

from __future__ import annotations

import logging
import resource
import signal
from pathlib import Path

import pytest
import torch

from moco_d2.core.errors import UserError
from moco_d2.core.io import CheckpointManager, load_checkpoint, save_atomic
from moco_d2.core.metrics import MetricWriter, read_metrics, setup_logging


@pytest.fixture
def moco_log(caplog):
    log = logging.getLogger("moco")
    log.addHandler(caplog.handler)
    level, log.level = log.level, logging.INFO
    yield caplog
    log.removeHandler(caplog.handler)
    log.setLevel(level)


def test_rotation_never_keeps_a_torn_file_instead_of_a_good_one(tmp_path: Path, moco_log) -> None:
    torn = tmp_path / "checkpoint_0001_iter0000003.pth"
    torn.write_bytes(b"torn")
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save({"i": 1}, "checkpoint_0001.pth")
    mgr.save({"i": 2}, "checkpoint_0002.pth")
    names = [p.name for p in mgr.checkpoints()]
    assert names == ["checkpoint_0001.pth", torn.name, "checkpoint_0002.pth"]  # two good ones kept
    mgr.save({"i": 3}, "checkpoint_0003.pth")  # the torn one is old enough now
    assert [p.name for p in mgr.checkpoints()] == ["checkpoint_0002.pth", "checkpoint_0003.pth"]


def test_rotation_with_only_a_torn_newest_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoint_0009.pth").write_bytes(b"torn")
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save({"i": 1}, "checkpoint_0001.pth")
    mgr.save({"i": 2}, "checkpoint_0002.pth")
    assert [p.name for p in mgr.checkpoints()] == ["checkpoint_0002.pth", "checkpoint_0009.pth"]
    assert mgr.latest_valid() == tmp_path / "checkpoint_0002.pth"


def test_latest_valid_names_the_torn_checkpoint_it_skips(tmp_path: Path, moco_log) -> None:
    save_atomic({"i": 1}, tmp_path / "checkpoint_0001.pth")
    (tmp_path / "checkpoint_0002.pth").write_bytes(b"torn")
    assert CheckpointManager(tmp_path).latest_valid() == tmp_path / "checkpoint_0001.pth"
    warnings = [r.getMessage() for r in moco_log.records if r.levelno == logging.WARNING]
    assert len(set(warnings)) == 1 and "skipping checkpoint_0002.pth" in warnings[0]  # one warning


def test_disk_full_during_torch_save_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    save_atomic({"v": torch.ones(3)}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(UserError) as info:
            save_atomic({"v": torch.zeros(100_000)}, path)  # 400 kB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    msg = str(info.value)
    assert msg.startswith(f"cannot write checkpoint {str(path)!r}: File too large") and "\n" not in msg
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]


def test_remove_stale_temp_files_only_removes_checkpoint_temps(tmp_path: Path) -> None:
    stale = [
        ".checkpoint_0001.pth.abc.tmp",
        ".checkpoint_0001_iter0000002.pth.x_y.tmp",
        ".model_final.pth.z.tmp",
    ]
    kept = [".config.yaml.a.tmp", "checkpoint_0001.pth", ".checkpoint_0001.pth.abc.tmpx", "notes.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = CheckpointManager(tmp_path).remove_stale_temp_files()
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_log_and_metrics_refuse_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").symlink_to(victim)
    with pytest.raises(UserError, match="log.txt' is a symlink; refusing to write through it"):
        setup_logging(out)
    (out / "metrics.jsonl").symlink_to(victim)
    writer = MetricWriter(out, tensorboard=False)
    with pytest.raises(UserError, match="metrics.jsonl' is a symlink"):
        writer.write(1, {"loss": 1.0})
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_output_dir_that_cannot_be_written_is_one_line(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out" if where == "under_a_file" else Path("/proc/self/nope")
    with pytest.raises(UserError, match="OUTPUT_DIR .* cannot be created") as info:
        setup_logging(out)
    assert "\n" not in str(info.value)


def test_metric_writer_drops_records_after_the_resumed_step(tmp_path: Path) -> None:
    writer = MetricWriter(tmp_path, tensorboard=False)
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # torn by a kill
    MetricWriter(tmp_path, tensorboard=False, resume_step=2).write(3, {"loss": 30.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
