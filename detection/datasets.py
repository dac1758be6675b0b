"""Dataset registration and checks for VOC-format detection data.

The standard VOC splits (``voc_2007_trainval``, ``voc_2012_trainval``, ``voc_2007_test``, ...) are
registered by Detectron2 itself under ``$DETECTRON2_DATASETS`` (default ``datasets/``). Custom
VOC-format datasets come from the ``DATASETS.VOC_CUSTOM`` config key, so a new dataset (own root,
own class names) needs no code. Before any loader is built, :func:`check_datasets` turns a missing
directory into one readable error that shows the expected layout.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from detection.voc_validation import validate_voc_split
from moco_d2.core.errors import UserError

VOC_LAYOUT = (
    "{root}/VOC2007/{{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/{{trainval,test}}.txt}} "
    "and {root}/VOC2012/{{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/trainval.txt}}"
)
CUSTOM_VOC_LAYOUT = "<root>/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt}"
COCO_LAYOUT = "{root}/coco/{{annotations/instances_{{train,val}}2017.json, train2017/, val2017/}}"
SPEC_KEYS = {"name", "root", "split", "classes", "year"}


def datasets_root() -> str:
    """Where Detectron2 looks for the standard datasets."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def read_split(root: str, split: str) -> list[str]:
    """Image ids listed in ``root/ImageSets/Main/<split>.txt`` (one per line)."""
    with open(os.path.join(root, "ImageSets", "Main", split + ".txt")) as f:
        return [line.split()[0] for line in f if line.strip()]


def load_voc_dataset(root: str, split: str, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Read a VOC-format split into Detectron2 dataset dicts.

    Same conventions as Detectron2's VOC loader (1-based inclusive pixel boxes become 0-based
    corners; "difficult" boxes are kept for training), but an unknown class name is a UserError
    naming the annotation file instead of a bare ``ValueError``.
    """
    class_index = {c: i for i, c in enumerate(classes)}
    dicts = []
    for image_id in read_split(root, split):
        xml_path = os.path.join(root, "Annotations", image_id + ".xml")
        tree = ET.parse(xml_path)
        annotations = []
        for obj in tree.findall("object"):
            name = obj.findtext("name", "").strip()
            if name not in class_index:
                raise UserError(
                    f"{xml_path}: object class {name!r} is not in the dataset's classes {list(classes)}"
                )
            box = obj.find("bndbox")
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            annotations.append(
                {
                    "category_id": class_index[name],
                    "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                    "bbox_mode": BoxMode.XYXY_ABS,
                }
            )
        dicts.append(
            {
                "file_name": os.path.join(root, "JPEGImages", image_id + ".jpg"),
                "image_id": image_id,
                "height": int(tree.findtext("size/height")),
                "width": int(tree.findtext("size/width")),
                "annotations": annotations,
            }
        )
    return dicts


def _parse_spec(spec: Any, index: int) -> dict[str, Any]:
    key = f"DATASETS.VOC_CUSTOM[{index}]"
    if not isinstance(spec, dict):
        raise UserError(
            f"{key} must be a dict with keys name, root, split, classes (optional year), got {spec!r}"
        )
    missing = {"name", "root", "split", "classes"} - set(spec)
    unknown = set(spec) - SPEC_KEYS
    if missing or unknown:
        raise UserError(
            f"{key}: expected keys name, root, split, classes (optional year); "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    classes = spec["classes"]
    if isinstance(classes, str) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{key}.classes must be a non-empty list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise UserError(f"{key}.classes has duplicate names: {list(classes)}")
    year = int(spec.get("year", 2007))
    if year not in (2007, 2012):
        raise UserError(f"{key}.year must be 2007 (11-point AP) or 2012 (area AP), got {year}")
    return {
        "name": str(spec["name"]),
        "root": os.path.expanduser(str(spec["root"])),
        "split": str(spec["split"]),
        "classes": [str(c) for c in classes],
        "year": year,
    }


def register_voc_dataset(name: str, root: str, split: str, classes: Sequence[str], year: int = 2007) -> None:
    """Register a VOC-format split under ``name`` (evaluated like VOC: per-class and mean AP).

    Registering the same name again with the same arguments is a no-op; with different arguments
    the old registration is replaced (useful for repeated runs in one process).
    """
    spec = (root, split, tuple(classes), year)
    if name in DatasetCatalog.list():
        if MetadataCatalog.get(name).get("voc_custom_spec", None) == spec:
            return
        if MetadataCatalog.get(name).get("voc_custom_spec", None) is None:
            raise UserError(
                f"DATASETS.VOC_CUSTOM: name {name!r} is already a built-in dataset; choose another name"
            )
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    classes = list(classes)
    DatasetCatalog.register(name, lambda: load_voc_dataset(root, split, classes))
    MetadataCatalog.get(name).set(
        thing_classes=classes,
        dirname=root,
        split=split,
        year=year,
        evaluator_type="pascal_voc",
        voc_custom_spec=spec,
    )


def register_custom_datasets(cfg: CfgNode) -> list[str]:
    """Register every entry of ``cfg.DATASETS.VOC_CUSTOM``; returns their names."""
    names = []
    for i, raw in enumerate(cfg.DATASETS.VOC_CUSTOM):
        spec = _parse_spec(raw, i)
        register_voc_dataset(spec["name"], spec["root"], spec["split"], spec["classes"], spec["year"])
        names.append(spec["name"])
    return names


def _missing_voc_parts(dirname: str, split: str) -> list[str]:
    wanted = [
        os.path.join(dirname, "Annotations"),
        os.path.join(dirname, "JPEGImages"),
        os.path.join(dirname, "ImageSets", "Main", split + ".txt"),
    ]
    return [p for p in wanted if not os.path.exists(p)]


def check_datasets(cfg: CfgNode, *, train: bool = True, contents: bool = True) -> None:
    """Fail early, with one readable error, when a dataset named by the config cannot be found.

    Checks DATASETS.TEST, and DATASETS.TRAIN when ``train``; also checks that the training classes
    agree with MODEL.ROI_HEADS.NUM_CLASSES. With ``contents``, every VOC-format split is then read
    through (annotations parsed, image headers opened; see :mod:`detection.voc_validation`), so
    that bad data fails before training rather than at evaluation after it.
    """
    names = list(cfg.DATASETS.TEST) + (list(cfg.DATASETS.TRAIN) if train else [])
    registered = set(DatasetCatalog.list())
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise UserError(
            f"dataset(s) {unknown} in DATASETS.TRAIN/TEST are not registered; use a built-in name "
            f"(e.g. voc_2007_trainval, voc_2012_trainval, voc_2007_test) or add them to DATASETS.VOC_CUSTOM"
        )
    problems, layouts = [], {}
    root = f"$DETECTRON2_DATASETS (={datasets_root()})"
    for name in dict.fromkeys(names):
        meta = MetadataCatalog.get(name)
        if meta.get("dirname", None) is not None:  # VOC format (built-in or DATASETS.VOC_CUSTOM)
            missing = _missing_voc_parts(meta.dirname, meta.split)
            custom = meta.get("voc_custom_spec", None) is not None
            layout = CUSTOM_VOC_LAYOUT if custom else VOC_LAYOUT.format(root=root)
        elif meta.get("json_file", None) is not None:  # COCO format
            missing = [p for p in (meta.json_file, meta.image_root) if not os.path.exists(p)]
            layout = COCO_LAYOUT.format(root=root)
        else:
            continue
        if missing:
            problems.append(f"{name} (missing {', '.join(missing)})")
            layouts[layout] = None
    if problems:
        raise UserError(f"dataset not found: {'; '.join(problems)}; expected {' and '.join(layouts)}")
    if train and cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise UserError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} but dataset "
                f"{cfg.DATASETS.TRAIN[0]!r} has {len(classes)} classes"
            )
    if contents:
        for name in dict.fromkeys(names):
            meta = MetadataCatalog.get(name)
            if meta.get("dirname", None) is not None and meta.get("thing_classes", None) is not None:
                try:
                    validate_voc_split(meta.dirname, meta.split, meta.thing_classes)
                except UserError as exc:
                    raise UserError(f"dataset {name!r}: {exc}") from None
