"""The pretraining reader and broken files of the same family as issue 16 (truncated / empty JPEG)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from moco_d2.core.images import SafeImageFolder
from pretrain.data import PretrainDataset


def _folder(root):
    for cls in ("class_a", "class_b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / cls / f"{i}.png")


def test_truncated_or_empty_jpeg_in_the_pretraining_set_is_skipped_and_reported(tmp_path):
    root = tmp_path / "data"
    _folder(root)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "class_a" / "t.jpg")
    data = (root / "class_a" / "t.jpg").read_bytes()
    (root / "class_a" / "t.jpg").write_bytes(data[: len(data) // 2])
    (root / "class_b" / "z.jpg").write_bytes(b"")
    images = SafeImageFolder(root, max_bad_fraction=0.5)
    names = [os.path.basename(p) for p, _ in images.samples]
    dataset = PretrainDataset(images, lambda img: (np.asarray(img), np.asarray(img)), seed=0)
    _, _, skipped = dataset[(0, names.index("t.jpg"))]
    assert skipped == str(root / "class_a" / "t.jpg")
    _, _, skipped = dataset[(0, names.index("z.jpg"))]
    assert skipped == str(root / "class_b" / "z.jpg")
