"""Prepare the demo's datasets from Fashion-MNIST, deterministically from a seed.

``python -m demo.data [--quick]`` writes, under ``datasets/demo`` (``datasets/demo-quick``):

* ``imagefolder/{train,val}/<class>/*.png`` -- laid out like ImageNet, read unchanged by the
  pretraining (labels ignored), kNN and linear-evaluation code;
* ``voc/{Annotations,JPEGImages,ImageSets/Main}`` -- a Pascal-VOC-format detection dataset of
  scenes that paste several Fashion-MNIST items at varied scales onto varied backgrounds, with
  tight boxes around each item's non-background pixels. ``trainval`` scenes use training-split
  items only, ``test`` scenes test-split items only;
* ``manifest.json`` -- the spec it was built from; a rerun with the same spec is a no-op.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from demo.fashion_mnist import CLASS_NAMES, DEFAULT_DIR, load_split
from moco_d2.core.errors import UserError, exit_on_user_error

FORMAT_VERSION = 1
# A resized item pixel at or above this grey level belongs to the item (Fashion-MNIST items sit
# on a pure black background; bilinear resizing leaves a faint halo below this level).
ITEM_THRESHOLD = 24


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the generated files (stored in the manifest)."""

    seed: int = 0
    train_per_class: int = 6000  # ImageFolder train images per class (all of Fashion-MNIST's 6000)
    val_per_class: int = 1000  # ImageFolder val images per class: the whole test split
    voc_trainval: int = 1500  # detection scenes built from training-split items
    voc_test: int = 300  # detection scenes built from test-split items
    scene_min: int = 128  # scene side lengths are drawn from [scene_min, scene_max]
    scene_max: int = 192
    items_min: int = 2  # items per scene are drawn from [items_min, items_max]
    items_max: int = 4
    scale_min: float = 1.0  # items are resized from 28 px by a factor in [scale_min, scale_max]
    scale_max: float = 3.0


PRESETS = {
    "full": DataSpec(),
    "quick": DataSpec(train_per_class=100, val_per_class=30, voc_trainval=80, voc_test=30),
    # The smallest end-to-end run (tests): still every class, split, and file type.
    "smoke": DataSpec(
        train_per_class=24, val_per_class=8, voc_trainval=16, voc_test=8, scene_min=96, scene_max=128
    ),
}


@dataclass(frozen=True)
class DemoData:
    """Paths of a prepared demo dataset."""

    root: Path

    @property
    def imagefolder(self) -> Path:
        return self.root / "imagefolder"

    @property
    def voc(self) -> Path:
        return self.root / "voc"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"


# ----------------------------------------------------------------------------------- ImageFolder
def select_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``per_class`` random samples of every class (sorted, so files follow the source)."""
    chosen = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c)
        if per_class > len(idx):
            raise UserError(f"per-class count {per_class}: class {CLASS_NAMES[c]} has only {len(idx)} images")
        chosen.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(chosen))


def write_imagefolder(out: Path, split: str, prefix: str, images: np.ndarray, labels: np.ndarray) -> int:
    """Write ``images`` as ``out/split/<class>/<prefix>_<index>.png`` (greyscale PNG)."""
    for name in CLASS_NAMES:
        (out / split / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        Image.fromarray(img, mode="L").save(out / split / CLASS_NAMES[label] / f"{prefix}_{i:05d}.png")
    return len(images)


# ----------------------------------------------------------------------------------------- scenes
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random float (h, w, 3) background: flat, gradient, blotchy noise or stripes."""
    kind = rng.integers(4)
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    if kind == 0:  # flat colour
        bg = np.broadcast_to(c0, (h, w, 3)).copy()
    elif kind == 1:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
        bg = c0 + t[..., None] * (c1 - c0)
    elif kind == 2:  # low-frequency colour noise
        cells = rng.integers(2, 7)
        grid = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR), dtype=np.float64)
    else:  # stripes at a random angle and period
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 24)
        yy, xx = np.mgrid[0:h, 0:w]
        t = (xx * np.cos(angle) + yy * np.sin(angle)) / period
        bg = np.where(((t % 1.0) < 0.5)[..., None], c0, c1)
    return bg + rng.normal(0, 4, size=(h, w, 3))  # sensor-like noise


def _item_patch(img: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resize a 28x28 item and crop it to its non-background pixels: (grey levels, mask)."""
    size = max(8, round(img.shape[0] * scale))
    grey = np.asarray(Image.fromarray(img, mode="L").resize((size, size), Image.BILINEAR))
    mask = grey >= ITEM_THRESHOLD
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return grey[r0:r1, c0:c1].astype(np.float64), mask[r0:r1, c0:c1]


def compose_scene(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, spec: DataSpec
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """Paste random items onto a random background without overlapping boxes.

    Returns the uint8 RGB scene and ``(label, x0, y0, x1, y1)`` per item, where the box is the
    half-open pixel range of the item's non-background pixels (x1, y1 exclusive).
    """
    h, w = (int(v) for v in rng.integers(spec.scene_min, spec.scene_max + 1, size=2))
    scene = _background(rng, h, w)
    boxes: list[tuple[int, int, int, int, int]] = []
    for _ in range(rng.integers(spec.items_min, spec.items_max + 1)):
        k = int(rng.integers(len(images)))
        grey, mask = _item_patch(images[k], rng.uniform(spec.scale_min, spec.scale_max))
        ph, pw = mask.shape
        if ph > h or pw > w:
            continue
        for _attempt in range(20):
            y0, x0 = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
            if all(x0 >= b[3] or x0 + pw <= b[1] or y0 >= b[4] or y0 + ph <= b[2] for b in boxes):
                break
        else:
            continue  # no free spot for this item
        region = scene[y0 : y0 + ph, x0 : x0 + pw]
        # Keep every item visible: bright items on dark backgrounds and dark ones on bright.
        dark_bg = region.mean() < 128
        tint = rng.uniform(170, 255, size=3) if dark_bg else rng.uniform(30, 110, size=3)
        colour = tint * (0.3 + 0.7 * grey[..., None] / 255.0)
        region[mask] = colour[mask]
        boxes.append((int(labels[k]), x0, y0, x0 + pw, y0 + ph))
    if not boxes:  # every placement failed: retry with a fresh draw (rare; needs tiny scenes)
        return compose_scene(rng, images, labels, spec)
    return np.clip(np.rint(scene), 0, 255).astype(np.uint8), boxes


def _voc_xml(image_id: str, h: int, w: int, boxes: list[tuple[int, int, int, int, int]]) -> ET.ElementTree:
    """Pascal VOC annotation; VOC boxes are 1-based inclusive, so xmin = x0 + 1 and xmax = x1."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "fashion_mnist_scenes"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for label, x0, y0, x1, y1 in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASS_NAMES[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bnd, tag).text = str(value)
    ET.indent(root)
    return ET.ElementTree(root)


def write_voc(
    out: Path,
    split: str,
    count: int,
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    spec: DataSpec,
) -> int:
    """Write ``count`` scenes of ``split`` and its ImageSets list; returns the number of boxes."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ids, n_boxes = [], 0
    for i in range(count):
        image_id = f"{split}_{i:05d}"
        scene, boxes = compose_scene(rng, images, labels, spec)
        Image.fromarray(scene).save(out / "JPEGImages" / f"{image_id}.jpg", quality=95)
        _voc_xml(image_id, scene.shape[0], scene.shape[1], boxes).write(
            out / "Annotations" / f"{image_id}.xml"
        )
        ids.append(image_id)
        n_boxes += len(boxes)
    (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return n_boxes


# ------------------------------------------------------------------------------------------ build
def _wanted(spec: DataSpec) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": dataclasses.asdict(spec)}


def is_prepared(root: Path, spec: DataSpec) -> bool:
    """True when ``root`` holds a dataset built from exactly ``spec``."""
    manifest = DemoData(Path(root)).manifest
    if not manifest.is_file():
        return False
    have = json.loads(manifest.read_text())
    wanted = _wanted(spec)
    return {k: have.get(k) for k in wanted} == wanted


def prepare(root: Path, spec: DataSpec, source_dir: Path = DEFAULT_DIR, log=print) -> DemoData:
    """Build the datasets under ``root`` unless a manifest with the same spec is already there.

    Everything is written to a sibling temp directory first and renamed at the end, so an
    interrupted run never leaves a half-written dataset that a later run would trust.
    """
    data = DemoData(Path(root))
    wanted = _wanted(spec)
    if is_prepared(data.root, spec):
        log(f"demo data: {data.root} is up to date (seed {spec.seed})")
        return data
    if data.manifest.is_file():
        log(f"demo data: {data.root} was built from another spec; rebuilding")
        shutil.rmtree(data.root)
    elif data.root.exists():
        raise UserError(f"{data.root}: exists but has no manifest.json; remove it or choose another --root")

    start = time.time()
    train_x, train_y = load_split("train", source_dir)
    test_x, test_y = load_split("test", source_dir)
    tmp = data.root.with_name(data.root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(spec.seed)
    tr = select_per_class(train_y, spec.train_per_class, rng)
    va = select_per_class(test_y, spec.val_per_class, rng)
    log(f"demo data: writing {len(tr)} train + {len(va)} val PNGs ...")
    n_train = write_imagefolder(tmp / "imagefolder", "train", "train", train_x[tr], train_y[tr])
    n_val = write_imagefolder(tmp / "imagefolder", "val", "test", test_x[va], test_y[va])
    log(f"demo data: composing {spec.voc_trainval} trainval + {spec.voc_test} test detection scenes ...")
    # Separate generators per split: the test scenes do not depend on the trainval count.
    scene_rng = np.random.default_rng([spec.seed, 1])
    boxes_tv = write_voc(tmp / "voc", "trainval", spec.voc_trainval, train_x, train_y, scene_rng, spec)
    scene_rng = np.random.default_rng([spec.seed, 2])
    boxes_te = write_voc(tmp / "voc", "test", spec.voc_test, test_x, test_y, scene_rng, spec)
    manifest = {
        **wanted,
        "source": str(source_dir),
        "class_names": list(CLASS_NAMES),
        "counts": {
            "imagefolder_train": n_train,
            "imagefolder_val": n_val,
            "voc_trainval_images": spec.voc_trainval,
            "voc_trainval_boxes": boxes_tv,
            "voc_test_images": spec.voc_test,
            "voc_test_boxes": boxes_te,
        },
        "seconds": round(time.time() - start, 1),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    data.root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(data.root)
    log(
        f"demo data: done in {manifest['seconds']}s -> {data.root} "
        f"({n_train}/{n_val} images, {spec.voc_trainval}/{spec.voc_test} scenes, {boxes_tv}/{boxes_te} boxes)"
    )
    return data


def default_root(preset: str) -> Path:
    return Path("datasets") / ("demo" if preset == "full" else f"demo-{preset}")


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Prepare the demo's ImageFolder and VOC-format datasets.")
    p.add_argument("--quick", action="store_true", help="tiny datasets for `make demo QUICK=1`")
    p.add_argument("--preset", choices=sorted(PRESETS), help="dataset size (overrides --quick)")
    p.add_argument("--root", type=Path, help="output directory (default: datasets/demo[-<preset>])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--source", type=Path, default=DEFAULT_DIR, help="directory of the Fashion-MNIST IDX files"
    )
    return p


def resolve_preset(quick: bool, preset: str | None) -> str:
    return preset or ("quick" if quick else "full")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_arg_parser().parse_args(argv)
    preset = resolve_preset(args.quick, args.preset)
    spec = dataclasses.replace(PRESETS[preset], seed=args.seed)
    prepare(args.root or default_root(preset), spec, args.source)


if __name__ == "__main__":
    sys.exit(main())
