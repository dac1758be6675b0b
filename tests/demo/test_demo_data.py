"""Demo data preparation: IDX parsing, tight boxes, split separation, determinism, errors."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo import data as demo_data
from demo import fashion_mnist
from demo.fashion_mnist import CLASS_NAMES
from moco_d2.core import debian
from moco_d2.core.errors import UserError


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_source(tmp_path: Path, per_class_train: int = 6, per_class_test: int = 3) -> Path:
    """Fake Fashion-MNIST: train items are 20x20 squares, test items 10x10 (told apart by size)."""
    src = tmp_path / "src"
    src.mkdir()
    for split, per_class, side in (("train", per_class_train, 20), ("t10k", per_class_test, 10)):
        labels = np.repeat(np.arange(10), per_class)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        images[:, 4 : 4 + side, 4 : 4 + side] = 200
        _write_idx(src / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(src / f"{split}-labels-idx1-ubyte.gz", labels)
    return src


def _boxes(xml_path: Path) -> list[tuple[str, int, int, int, int]]:
    out = []
    for obj in ET.parse(xml_path).findall("object"):
        b = obj.find("bndbox")
        out.append((obj.find("name").text, *(int(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))))
    return out


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_read_idx_roundtrip_and_errors(tmp_path):
    src = _fake_source(tmp_path)
    images, labels = fashion_mnist.load_split("train", src)
    assert images.shape == (60, 28, 28) and labels.tolist() == np.repeat(np.arange(10), 6).tolist()
    assert images[0, 4, 4] == 200 and images[0, 24, 24] == 0
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="t10k-labels"):
        fashion_mnist.load_split("test", src)
    with pytest.raises(UserError, match="missing"):
        fashion_mnist.load_split("train", tmp_path / "nowhere")


def test_missing_package_without_root_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", tmp_path / "absent")
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="sudo apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.ensure_installed(tmp_path / "absent")


def test_scene_boxes_are_tight_and_disjoint():
    rng = np.random.default_rng(3)
    images = np.zeros((10, 28, 28), np.uint8)
    for i in range(10):  # items of different shapes: an (i+8) x 12 rectangle
        images[i, 2 : 10 + i, 5:17] = 255
    spec = dataclasses.replace(demo_data.PRESETS["smoke"], items_min=3, items_max=3)
    for _ in range(5):
        twin = copy.deepcopy(rng)  # replay the background the scene was drawn on
        h, w = (int(v) for v in twin.integers(spec.scene_min, spec.scene_max + 1, size=2))
        background = np.clip(np.rint(demo_data._background(twin, h, w)), 0, 255).astype(np.uint8)
        scene, boxes = demo_data.compose_scene(rng, images, np.arange(10), spec)
        changed = (scene != background).any(-1)
        covered = np.zeros_like(changed)
        for _label, x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert not covered[y0:y1, x0:x1].any(), "boxes overlap"
            covered[y0:y1, x0:x1] = True
            inside = changed[y0:y1, x0:x1]
            # Tight: the item reaches every side of its box.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert not changed[~covered].any(), "pixels changed outside the boxes"


def test_prepare_layout_split_separation_and_determinism(tmp_path):
    src = _fake_source(tmp_path)
    spec = demo_data.DataSpec(
        seed=5, train_per_class=4, val_per_class=2, voc_trainval=6, voc_test=4, scale_min=1.0, scale_max=1.0
    )
    data = demo_data.prepare(tmp_path / "a", spec, src, log=lambda *_: None)
    for split, n in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (data.imagefolder / split).iterdir()) == sorted(CLASS_NAMES)
        files = list((data.imagefolder / split).rglob("*.png"))
        assert len(files) == 10 * n
        assert Image.open(files[0]).size == (28, 28)
    main = data.voc / "ImageSets" / "Main"
    for split, count, side in (("trainval", 6, 20), ("test", 4, 10)):
        ids = main.joinpath(f"{split}.txt").read_text().split()
        assert len(ids) == count
        for image_id in ids:
            w, h = Image.open(data.voc / "JPEGImages" / f"{image_id}.jpg").size
            boxes = _boxes(data.voc / "Annotations" / f"{image_id}.xml")
            assert boxes
            for name, xmin, ymin, xmax, ymax in boxes:
                assert name in CLASS_NAMES and 1 <= xmin <= xmax <= w and 1 <= ymin <= ymax <= h
                # Unscaled fake items: train squares are 20 px, test squares 10 px.
                assert (xmax - xmin + 1, ymax - ymin + 1) == (side, side)
    # Same seed -> identical bytes; rerun is a no-op; another seed differs.
    again = demo_data.prepare(tmp_path / "b", spec, src, log=lambda *_: None)
    assert _tree_digest(data.root) == _tree_digest(again.root)
    stamp = data.manifest.stat().st_mtime_ns
    demo_data.prepare(tmp_path / "a", spec, src, log=lambda *_: None)
    assert data.manifest.stat().st_mtime_ns == stamp
    other = demo_data.prepare(tmp_path / "c", dataclasses.replace(spec, seed=6), src, log=lambda *_: None)
    assert _tree_digest(other.root) != _tree_digest(data.root)


def test_prepare_refuses_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="no manifest"):
        demo_data.prepare(tmp_path / "mine", demo_data.PRESETS["smoke"], _fake_source(tmp_path))
