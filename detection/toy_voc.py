"""Tiny VOC- and COCO-format datasets of coloured rectangles, for smoke tests of the detection pipeline.

It has the exact on-disk layout of PASCAL VOC (Annotations/*.xml, JPEGImages/*.jpg,
ImageSets/Main/<split>.txt), so it exercises the same loader, evaluator and config keys as the
real data, in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
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


# COCO ids and names of three real COCO categories: Detectron2's built-in COCO metadata maps them.
TOY_COCO_CATEGORIES = ((1, "person"), (2, "bicycle"), (3, "car"))


def write_toy_coco(datasets_root: str, images: dict[str, int] | None = None, seed: int = 0) -> None:
    """The built-in COCO 2017 layout under ``datasets_root/coco`` (annotations/instances_<split>.json,
    <split>/*.jpg) with the toy rectangles, each with its box and a polygon mask, so that Detectron2's
    own ``coco_2017_train`` / ``coco_2017_val`` registrations load it when
    ``DETECTRON2_DATASETS=datasets_root``."""
    images = images or {"train2017": 6, "val2017": 3}
    coco = os.path.join(datasets_root, "coco")
    os.makedirs(os.path.join(coco, "annotations"), exist_ok=True)
    for n, (split, count) in enumerate(images.items()):
        voc = os.path.join(coco, f"_voc_{split}")
        ids = write_toy_voc(voc, {split: count}, seed=seed + n)[split]
        os.makedirs(os.path.join(coco, split), exist_ok=True)
        entries, annotations = [], []
        for number, image_id in enumerate(ids, 1):
            os.replace(
                os.path.join(voc, "JPEGImages", image_id + ".jpg"),
                os.path.join(coco, split, image_id + ".jpg"),
            )
            tree = ET.parse(os.path.join(voc, "Annotations", image_id + ".xml"))
            width, height = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
            entries.append({"id": number, "file_name": image_id + ".jpg", "width": width, "height": height})
            for obj in tree.findall("object"):
                category = TOY_COCO_CATEGORIES[TOY_CLASSES.index(obj.findtext("name"))][0]
                x0, y0, x1, y1 = (
                    float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")
                )
                x0, y0 = x0 - 1.0, y0 - 1.0  # VOC's 1-based inclusive pixels -> COCO's 0-based corners
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": number,
                        "category_id": category,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                        "iscrowd": 0,
                    }
                )
        shutil.rmtree(voc)
        # A real COCO file lists all 80 categories; Detectron2 checks them against its built-in metadata.
        from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

        categories = [
            {"id": c["id"], "name": c["name"], "supercategory": "thing"}
            for c in COCO_CATEGORIES
            if c["isthing"]
        ]
        with open(os.path.join(coco, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": entries, "annotations": annotations, "categories": categories}, f)
