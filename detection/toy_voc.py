"""A tiny VOC-format dataset of coloured rectangles, for smoke tests of the detection pipeline.

It has the exact on-disk layout of PASCAL VOC (Annotations/*.xml, JPEGImages/*.jpg,
ImageSets/Main/<split>.txt), so it exercises the same loader, evaluator and config keys as the
real data, in seconds on a CPU.
"""

from __future__ import annotations

import os
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

TOY_CLASSES = ("red", "green", "blue")
_COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def annotation_xml(filename: str, width: int, height: int, objects: list[tuple[str, tuple[int, ...]]]) -> str:
    """A VOC annotation; boxes are (xmin, ymin, xmax, ymax), 1-based inclusive pixel indices."""
    parts = [
        "<annotation>",
        f"  <filename>{escape(filename)}</filename>",
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>",
    ]
    for name, (x0, y0, x1, y1) in objects:
        parts += [
            "  <object>",
            f"    <name>{escape(name)}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>",
            f"    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def write_toy_voc(
    root: str, splits: dict[str, int] | None = None, size: tuple[int, int] = (96, 80), seed: int = 0
) -> dict[str, list[str]]:
    """Write images with 1-3 rectangles each (one colour per class) under ``root``.

    ``splits`` maps split name -> number of images (default trainval 8, test 4); returns the image
    ids per split. ``size`` is (width, height).
    """
    splits = splits or {"trainval": 8, "test": 4}
    rng = np.random.default_rng(seed)
    width, height = size
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    ids: dict[str, list[str]] = {}
    n = 0
    for split, count in splits.items():
        ids[split] = []
        for _ in range(count):
            image_id = f"{n:06d}"
            n += 1
            pixels = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
            objects = []
            for _ in range(int(rng.integers(1, 4))):
                name = TOY_CLASSES[int(rng.integers(len(TOY_CLASSES)))]
                w, h = int(rng.integers(16, width // 2)), int(rng.integers(16, height // 2))
                x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
                pixels[y0 : y0 + h, x0 : x0 + w] = _COLOURS[name]
                objects.append((name, (x0 + 1, y0 + 1, x0 + w, y0 + h)))
            Image.fromarray(pixels).save(os.path.join(root, "JPEGImages", image_id + ".jpg"), quality=95)
            with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
                f.write(annotation_xml(image_id + ".jpg", width, height, objects))
            ids[split].append(image_id)
        with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("\n".join(ids[split]) + "\n")
    return ids
