"""Atomic writes give files the usual permissions (0o666 & ~umask), not mkstemp's 0600."""

from __future__ import annotations

import os

import pytest
import torch

from moco_d2.core.io import CheckpointManager, save_atomic, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_and_json_are_readable_per_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        ckpt = CheckpointManager(tmp_path).save({"epoch": 1}, "checkpoint_0001.pth")
        single = save_atomic({"x": torch.zeros(1)}, tmp_path / "model.pth")
        js = write_json_atomic({"a": 1}, tmp_path / "r.json")
    finally:
        os.umask(old)
    for p in (ckpt, single, js):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
