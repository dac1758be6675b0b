"""core/images: decoding every PIL mode to the right 8-bit RGB, and a folder scan that cannot loop or block.

Issue 16: a 16-bit PNG decoded as pure white; a ``class_a/loop -> ..`` symlink turned 4 images into 164
mislabelled samples; plus the same family: a FIFO named like an image, non-UTF-8 file names, a 1x1 image.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moco_d2.core.errors import UserError
from moco_d2.core.images import (
    build_eval_transform,
    build_lincls_train_transform,
    load_rgb,
    scan_image_folder,
    to_rgb,
)

ROOT = Path(__file__).resolve().parents[2]


def _gray(path: Path) -> np.ndarray:
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0]


def test_16bit_png_keeps_its_values(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[0, 256, 32768, 65535], [1000, 20000, 40000, 60000]], np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert _gray(path).tolist() == [[0, 1, 128, 255], [3, 78, 156, 234]]  # v >> 8, not clipped to 255


def test_32bit_int_and_float_images_keep_their_values(tmp_path):
    i32 = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 4096, 65535, -7]], np.int32)).save(i32)  # 16-bit data held as int32
    assert _gray(i32).tolist() == [[0, 16, 255, 0]]
    big = tmp_path / "big.tif"
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], np.int32)).save(big)  # full int32 range
    assert _gray(big).tolist() == [[0, 128, 255]]
    unit = to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32)))
    assert np.asarray(unit)[..., 0].tolist() == [[0, 128, 255, 0]]  # [0, 1] floats scaled to 0..255
    wide = to_rgb(Image.fromarray(np.array([[-3.0, 100.4, 300.0]], np.float32)))
    assert np.asarray(wide)[..., 0].tolist() == [[0, 100, 255]]  # otherwise 0..255, clipped


def test_palette_alpha_and_cmyk_images_become_rgb(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1])
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_rgb(str(tmp_path / "p.png"))).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    rgba = Image.new("RGBA", (1, 1), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    assert np.asarray(load_rgb(str(tmp_path / "rgba.png"))).tolist() == [[[10, 20, 30]]]  # alpha dropped
    Image.new("LA", (1, 1), (77, 5)).save(tmp_path / "la.png")
    assert np.asarray(load_rgb(str(tmp_path / "la.png"))).tolist() == [[[77, 77, 77]]]
    Image.new("CMYK", (1, 1), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = np.asarray(load_rgb(str(tmp_path / "cmyk.jpg")))[0, 0].tolist()
    assert r > 240 and g < 15 and b < 15  # red
    for mode in ("1", "L", "I;16B", "YCbCr", "RGBX", "HSV"):
        assert to_rgb(Image.new(mode, (2, 2))).mode == "RGB"


def _folder(root: Path) -> None:
    for cls in ("class_a", "class_b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / cls / f"{i}.png")


def test_symlink_loop_neither_multiplies_nor_mislabels(tmp_path, caplog):
    root = tmp_path / "data"
    _folder(root)
    os.symlink("..", root / "class_a" / "loop")  # back to the root: would re-walk both classes as class_a
    os.symlink("../class_b", root / "class_a" / "b_again")  # class_b's images labelled class_a
    os.symlink(".", root / "class_b" / "self")
    outside = tmp_path / "extra"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "x.png")
    os.symlink(outside, root / "class_b" / "extra")  # a real directory elsewhere: followed, once
    os.symlink(outside, root / "class_b" / "extra2")
    with caplog.at_level(logging.WARNING, logger="moco"):
        samples, classes = scan_image_folder(root)
    names = [(os.path.relpath(p, root), t) for p, t in samples]
    assert classes == ["class_a", "class_b"]
    assert names == [
        ("class_a/0.png", 0),
        ("class_a/1.png", 0),
        ("class_b/0.png", 1),
        ("class_b/1.png", 1),
        ("class_b/extra/x.png", 1),
    ]
    assert "loop" in caplog.text and "b_again" in caplog.text and "extra2" in caplog.text


def test_fifo_named_like_an_image_is_not_listed(tmp_path):
    root = tmp_path / "data"
    _folder(root)
    os.mkfifo(root / "class_a" / "pipe.jpg")  # opening it would block the loader forever
    (root / "class_a" / "dir.png").mkdir()  # a directory named like an image: walked, not opened
    os.symlink("missing.png", root / "class_b" / "dangling.png")  # kept: reported as unreadable later
    samples, _ = scan_image_folder(root)
    names = sorted(os.path.relpath(p, root) for p, _ in samples)
    assert names == [
        "class_a/0.png",
        "class_a/1.png",
        "class_b/0.png",
        "class_b/1.png",
        "class_b/dangling.png",
    ]


def test_one_pixel_image_goes_through_the_eval_and_train_transforms(tmp_path):
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "tiny.png")
    img = load_rgb(str(tmp_path / "tiny.png"))
    assert build_eval_transform(16, 18)(img).shape == (3, 16, 16)
    assert build_lincls_train_transform(16)(img).shape == (3, 16, 16)


def test_non_utf8_file_name_is_reported_in_one_printable_line(tmp_path):
    """A corrupt file whose name is not UTF-8: the warning and the one-line error must still print."""
    root = tmp_path / "data"
    _folder(root)
    bad = os.path.join(os.fsencode(root / "class_a"), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    code = (
        "import logging, sys\n"
        "from moco_d2.core.metrics import setup_logging\n"
        "from moco_d2.core.images import SafeImageFolder\n"
        f"setup_logging({str(tmp_path / 'out')!r})\n"
        f"ds = SafeImageFolder({str(root)!r}, max_bad_fraction=1.0)\n"
        "[ds.load(i) for i in range(len(ds))]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "caf\\xe9.png" in (tmp_path / "out" / "log.txt").read_text()


def test_root_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(UserError, match=r"'.*data' is a file, not a folder"):
        scan_image_folder(tmp_path / "data")
