"""Checks of a VOC-format split's contents, run before training so that bad data fails in seconds.

Without them, a broken test split only surfaces at evaluation after the whole training run, and
some problems never surface at all (boxes outside the image are silently clipped or kept).
Each problem is one :class:`UserError` naming the file (and object) and what was expected.

Cost: every annotation is parsed (about 0.1 ms each) and every image is opened header-only
(``Image.open(...).size`` reads the JPEG header, not the pixels). A truncated JPEG is found by its
missing end-of-image marker (the last bytes of the file); only a file without one is decoded in full
to confirm. Decoding every image would cost ~2-5 ms each (a minute for VOC07+12's 16.5k images), so it
is not done: a JPEG that ends properly but is corrupt inside is still reported by the loader. Nothing
is cached on disk.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from PIL import Image

from moco_d2.core.errors import UserError

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (Detectron2 applies them)
_JPEG_END = b"\xff\xd9"
_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


def read_split_ids(split_file: str) -> list[str]:
    """The image ids of a split file; an empty one is an error."""
    try:
        with open(split_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{split_file}: cannot read the split file ({exc})") from None
    if not ids:
        raise UserError(f"{split_file} has no image ids; expected one image id per line")
    return ids


def _image_size(path: str, xml_path: str) -> tuple[int, int]:
    """(width, height) as Detectron2 will see the image (EXIF orientation applied), header-only."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
            orientation = im.getexif().get(_EXIF_ORIENTATION)
    except Exception as exc:  # PIL reports unreadable files as OSError, SyntaxError, ValueError...
        raise UserError(
            f"{path}: not a readable image ({type(exc).__name__}: {exc}); annotated in {xml_path}"
        ) from None
    if orientation in _TRANSPOSED:
        width, height = height, width
    if fmt != "JPEG" or not _ends_like_jpeg(path):
        _decode(path)  # rare: confirm by decoding the whole image
    return width, height


def _ends_like_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        return _JPEG_END in f.read()


def _decode(path: str) -> None:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:
        raise UserError(
            f"{path}: truncated or corrupt image ({type(exc).__name__}: {exc}); expected a complete JPEG"
        ) from None


def _number(text: str | None, xml_path: str, where: str, key: str) -> float:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"{xml_path}: {where}: <{key}> is {text!r}; expected a number")
    return value


def check_annotation(xml_path: str, classes: Sequence[str]) -> tuple[int, int]:
    """Parse and check one annotation file; returns its (width, height)."""
    try:
        tree = ET.parse(xml_path)
    except ET.ParseError as exc:
        raise UserError(f"{xml_path}: malformed XML ({exc})") from None
    except OSError as exc:
        raise UserError(f"{xml_path}: cannot read annotation ({exc.strerror or exc})") from None
    size = tree.find("size")
    if size is None:
        raise UserError(
            f"{xml_path}: no <size> element; expected <size><width>W</width><height>H</height></size>"
        )
    w_text, h_text = size.findtext("width"), size.findtext("height")
    try:
        width, height = int(w_text.strip()), int(h_text.strip())  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        width = height = 0
    if width <= 0 or height <= 0:
        raise UserError(
            f"{xml_path}: <size> has width {w_text!r}, height {h_text!r}; expected positive integers"
        )
    known = set(classes)
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        where = f"object {k} ({name!r})"
        if name not in known:
            raise UserError(
                f"{xml_path}: {where}: class {name!r} is not one of the dataset's classes {list(classes)}"
            )
        difficult = obj.findtext("difficult")
        if difficult is not None and difficult.strip() not in ("", "0", "1"):
            raise UserError(f"{xml_path}: {where}: <difficult> is {difficult.strip()!r}; expected 0 or 1")
        box = obj.find("bndbox")
        if box is None:
            raise UserError(
                f"{xml_path}: {where} has no <bndbox>; expected "
                "<bndbox><xmin>..</xmin><ymin>..</ymin><xmax>..</xmax><ymax>..</ymax></bndbox>"
            )
        x0, y0, x1, y1 = (_number(box.findtext(key), xml_path, where, key) for key in _BOX_KEYS)
        shown = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if x1 < x0 or y1 < y0:
            raise UserError(
                f"{xml_path}: {where}: inverted box (xmin, ymin, xmax, ymax) = {shown}; expected xmin <= xmax "
                "and ymin <= ymax"
            )
        # VOC boxes are 1-based inclusive pixels: inside the image means 1 <= x <= width. One pixel of
        # slack either side (0 or width + 1) is tolerated: common off-by-one of annotation tools.
        if x0 > width or y0 > height or x1 < 1 or y1 < 1:
            raise UserError(
                f"{xml_path}: {where}: box {shown} lies fully outside the {width}x{height} image; "
                f"expected 1 <= x <= {width}, 1 <= y <= {height} (VOC 1-based pixels)"
            )
        if x0 < 0 or y0 < 0 or x1 > width + 1 or y1 > height + 1:
            raise UserError(
                f"{xml_path}: {where}: box {shown} extends outside the {width}x{height} image by more than "
                f"one pixel; expected 1 <= x <= {width}, 1 <= y <= {height} (VOC 1-based pixels)"
            )
    return width, height


def validate_voc_split(root: str, split: str, classes: Sequence[str]) -> int:
    """Check every image and annotation listed in ``root/ImageSets/Main/<split>.txt``; returns the count."""
    split_file = os.path.join(root, "ImageSets", "Main", split + ".txt")
    ids = read_split_ids(split_file)
    for image_id in ids:
        xml_path = os.path.join(root, "Annotations", image_id + ".xml")
        jpg_path = os.path.join(root, "JPEGImages", image_id + ".jpg")
        if not os.path.isfile(xml_path):
            raise UserError(f"annotation {xml_path} is missing; expected one per image id in {split_file}")
        if not os.path.isfile(jpg_path):
            raise UserError(f"image {jpg_path} is missing; expected one per image id in {split_file}")
        width, height = check_annotation(xml_path, classes)
        actual = _image_size(jpg_path, xml_path)
        if actual != (width, height):
            raise UserError(
                f"{jpg_path} is {actual[0]}x{actual[1]} but {xml_path} says <size> {width}x{height}; "
                "expected the image's real width and height"
            )
    return len(ids)
