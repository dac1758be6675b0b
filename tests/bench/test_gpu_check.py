"""bench/gpu_check.sh cannot rot unseen: its entry-point part (make pretrain through the launcher, kill +
RESUME auto, lincls, knn, convert, detection/train_net.py on a toy VOC) runs here on the CPU, the same
sequence the lent GPU machine runs on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pretrain_utils import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_entrypoints_run_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MASTER_PORT": str(free_port())}
    cmd = [
        "bash",
        "bench/gpu_check.sh",
        "PARTS=entrypoints",
        "DEVICE=cpu",
        f"PYTHON={sys.executable}",
        f"OUT={tmp_path}",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )  # a hang guard: ~60 s on a quiet machine
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all entry points ran on cpu" in out
    assert "=== entrypoints: exit 0" in out
    work = tmp_path / "entrypoints_work"
    assert (work / "moco.pkl").stat().st_size > 0 and (work / "voc_out" / "metrics.json").is_file()
    assert "speed parts skipped" in out


def test_gpu_check_skips_parts_it_has_no_time_for(tmp_path):
    """The whole call must end within the lent machine's limit: a part the BUDGET cannot fit is skipped,
    said so in the summary, and the call fails."""
    cmd = ["bash", "bench/gpu_check.sh", "PARTS=entrypoints", "DEVICE=cpu", "BUDGET=20"]
    proc = subprocess.run(
        [*cmd, f"PYTHON={sys.executable}", f"OUT={tmp_path}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "=== entrypoints: SKIPPED" in out and "entrypoints: skipped (budget)" in out
    assert not (tmp_path / "entrypoints_work").exists()
