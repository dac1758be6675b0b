"""COCO transfer: a ResNet-50 converts and validates into Mask R-CNN C4 (the mask head is trained fresh)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision

from convert import to_detectron2

ROOT = Path(__file__).resolve().parents[2]


def test_r50_converts_and_validates_into_mask_rcnn_c4(tmp_path):
    src = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), src)
    out = tmp_path / "out.pkl"
    old = os.umask(0o022)
    try:
        report = to_detectron2(src, out, config_file=ROOT / "configs" / "coco_c4.yaml")
    finally:
        os.umask(old)
    assert report.validation.ok
    assert "mask head" in report.validation.unmatched
    assert out.stat().st_mode & 0o777 == 0o644
