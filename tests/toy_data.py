"""Tiny VOC- and COCO-format datasets of coloured rectangles, for smoke tests of the detection pipeline.

It has the exact on-disk layout of PASCAL VOC (Annotations/*.xml, JPEGImages/*.jpg,
ImageSets/Main/<split>.txt), so it exercises the same loader, evaluator and config keys as the
real data, in seconds on a CPU.
"""

from __future__ import annotations

import json
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


def toy_scene(
    rng: np.random.Generator, width: int, height: int
) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """A noisy grey image with 1-3 class-coloured rectangles; objects are (class, (x0, y0, w, h)) in
    0-based pixels."""
    pixels = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        name = TOY_CLASSES[int(rng.integers(len(TOY_CLASSES)))]
        w, h = int(rng.integers(16, width // 2)), int(rng.integers(16, height // 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        pixels[y0 : y0 + h, x0 : x0 + w] = _COLOURS[name]
        objects.append((name, (x0, y0, w, h)))
    return pixels, objects


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
            pixels, objects = toy_scene(rng, width, height)
            # VOC boxes: 1-based inclusive pixel indices
            boxes = [(name, (x0 + 1, y0 + 1, x0 + w, y0 + h)) for name, (x0, y0, w, h) in objects]
            Image.fromarray(pixels).save(os.path.join(root, "JPEGImages", image_id + ".jpg"), quality=95)
            with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
                f.write(annotation_xml(image_id + ".jpg", width, height, boxes))
            ids[split].append(image_id)
        with open(os.path.join(root, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("\n".join(ids[split]) + "\n")
    return ids


# COCO ids and names of three real COCO categories: Detectron2's built-in COCO metadata maps them.
TOY_COCO_CATEGORIES = ((1, "person"), (2, "bicycle"), (3, "car"))


def write_toy_coco(
    datasets_root: str, images: dict[str, int] | None = None, size: tuple[int, int] = (96, 80), seed: int = 0
) -> None:
    """The built-in COCO 2017 layout under ``datasets_root/coco`` (annotations/instances_<split>.json,
    <split>/*.jpg) with the toy rectangles, each with its box and a polygon mask, so that Detectron2's
    own ``coco_2017_train`` / ``coco_2017_val`` registrations load it when
    ``DETECTRON2_DATASETS=datasets_root``."""
    # A real COCO file lists all 80 categories; Detectron2 checks them against its built-in metadata.
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    categories = [
        {"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in COCO_CATEGORIES if c["isthing"]
    ]
    category_of = {name: TOY_COCO_CATEGORIES[i][0] for i, name in enumerate(TOY_CLASSES)}
    images = images or {"train2017": 6, "val2017": 3}
    width, height = size
    coco = os.path.join(datasets_root, "coco")
    os.makedirs(os.path.join(coco, "annotations"), exist_ok=True)
    for n, (split, count) in enumerate(images.items()):
        rng = np.random.default_rng(seed + n)
        os.makedirs(os.path.join(coco, split), exist_ok=True)
        entries, annotations = [], []
        for number in range(1, count + 1):
            file_name = f"{number - 1:06d}.jpg"
            pixels, objects = toy_scene(rng, width, height)
            Image.fromarray(pixels).save(os.path.join(coco, split, file_name), quality=95)
            entries.append({"id": number, "file_name": file_name, "width": width, "height": height})
            for name, (x0, y0, w, h) in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": number,
                        "category_id": category_of[name],
                        "bbox": [x0, y0, w, h],
                        "area": w * h,
                        "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
                        "iscrowd": 0,
                    }
                )
        with open(os.path.join(coco, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": entries, "annotations": annotations, "categories": categories}, f)
