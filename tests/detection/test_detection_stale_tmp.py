"""Issue 16: the temp files of an interrupted detection checkpoint save are removed at the next start."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from detection.checkpoint import VerifiedCheckpointer


def test_stale_checkpoint_temp_files_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".model_0000004.pth.999999999.deadbeef.tmp"  # no such pid: a kill -9 mid-save
    live = tmp_path / f".model_0000009.pth.{os.getppid()}.0123abcd.tmp"  # its writer still runs
    other = tmp_path / ".notes.1.tmp"
    for p in (dead, live, other):
        p.write_bytes(b"x" * 100)
    VerifiedCheckpointer(nn.Linear(1, 1), str(tmp_path), save_to_disk=True)
    assert not dead.exists() and live.exists() and other.exists()
