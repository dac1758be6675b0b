"""Labelled image folders, seeding and evaluation transforms, shared by pretraining and evaluation.

* :class:`SafeImageFolder` is a labelled ImageFolder (same classes/targets as torchvision's) that
  reports bad data in one line: a missing root, a class folder without images, no images at all.
  The scan follows symlinks but enters every directory at most once (a ``class_a/loop -> ..`` link
  cannot multiply or mislabel samples), and lists regular files only (a FIFO named ``x.jpg`` would block).
  Unreadable or corrupt files are named in a warning and counted; past ``max_bad_fraction`` of the
  dataset it stops with a clear error. Training draws (pretraining, lincls training) use the next
  readable index instead, deterministically; evaluation (:meth:`SafeImageFolder.skipping`, used by
  ``make_eval_loader``) drops the file, so every distinct readable image is counted exactly once.
* :func:`to_rgb`: any PIL mode as 8-bit RGB with its real values (16-bit, 32-bit, float, palette with
  transparency, CMYK, alpha dropped).
* :func:`mix_seed` / :func:`seeded_rng`: per-sample randomness as a pure function of integers.
* ``IMAGENET_MEAN`` / ``IMAGENET_STD`` and the evaluation / linear-classification transforms.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms

from moco_d2.core.errors import UserError

logger = logging.getLogger("moco")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadDataError(UserError):
    """Too many unreadable images. Survives the trip out of a DataLoader worker as a one-line message.

    A DataLoader re-raises a worker's exception as ``type(message=<text with the worker traceback>)``
    when the type has a ``message`` attribute; the original one-line message is recovered from it.
    """

    message = "bad data"

    def __init__(self, text: str = "", message: str | None = None) -> None:
        if message is not None:
            marker = f"{type(self).__name__}: "
            lines = [ln for ln in message.splitlines() if marker in ln]
            text = lines[-1].split(marker, 1)[1] if lines else message
        super().__init__(text)
        self.message = text


def display_path(path: str) -> str:
    """``path`` printable in any UTF-8 log or message (undecodable bytes of a file name as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _dir_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_images(class_dir: str, visited: set[tuple[int, int]]) -> list[str]:
    """Image files under ``class_dir`` (sorted, depth first), following symlinks into each directory once.

    ``visited`` holds the (st_dev, st_ino) of every directory already claimed (the root, every class
    folder, everything scanned so far): a link back into one of them is a loop or a second label for
    the same images, and is skipped with a warning.
    """
    found: list[str] = []
    stack = [class_dir]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            logger.warning("skipping unreadable folder %s (%s)", display_path(d), exc.strerror or exc)
            continue
        subdirs = []
        for e in entries:
            try:
                if e.is_dir():  # follows symlinks
                    key = _dir_key(e.path)
                    if key is None or key in visited:
                        logger.warning(
                            "not following %s: it leads to %s, which is already scanned (a symlink loop "
                            "or a second path to the same images)",
                            display_path(e.path),
                            display_path(os.path.realpath(e.path)),
                        )
                        continue
                    visited.add(key)
                    subdirs.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS) and (
                    e.is_file() or (e.is_symlink() and not os.path.exists(e.path))
                ):
                    # Regular files (a FIFO or device named like an image would block or never end);
                    # a dangling symlink is kept so that it is reported as unreadable, not silently lost.
                    found.append(e.path)
            except OSError:
                continue
        stack.extend(reversed(subdirs))
    return found


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of an ImageFolder ``root/<class>/**/<image>``; classes sorted by name.

    A sample's label is the class folder directly under ``root`` it was found in.
    """
    root = os.fspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(
            f"image folder {display_path(root)!r} is a file, not a folder (expected "
            f"{display_path(root)}/<class>/<image>)"
        )
    if not os.path.isdir(root):
        raise UserError(
            f"image folder {display_path(root)!r} does not exist (expected {display_path(root)}/<class>/<image>)"
        )
    try:
        with os.scandir(root) as it:
            class_entries = sorted(
                (e for e in it if e.is_dir() and not e.name.startswith(".")), key=lambda e: e.name
            )
    except OSError as exc:
        raise UserError(
            f"image folder {display_path(root)!r} cannot be read ({exc.strerror or exc})"
        ) from None
    classes = [e.name for e in class_entries]
    if not classes:
        raise UserError(
            f"image folder {display_path(root)!r} has no class folders (expected {display_path(root)}/<class>/<image>)"
        )
    visited = {k for k in map(_dir_key, [root, *(e.path for e in class_entries)]) if k is not None}
    samples: list[tuple[str, int]] = []
    for idx, entry in enumerate(class_entries):
        found = _walk_images(entry.path, visited)
        if not found:
            raise UserError(
                f"class folder {display_path(entry.path)!r} has no images "
                f"(looked for {', '.join(IMG_EXTENSIONS)})"
            )
        samples.extend((path, idx) for path in found)
    return samples, classes


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, keeping its real values (PIL's ``convert("RGB")`` clips high-bit-depth ones).

    * 16-bit (``I;16*``): the top 8 bits (``v >> 8``: 0..65535 -> 0..255).
    * 32-bit integers (``I``): values in 0..65535 are 16-bit data (what PIL decodes 16-bit PNG/TIFF/PGM
      to); larger ones take the top 8 bits of the non-negative int32 range (``v >> 23``). Negatives -> 0.
    * float (``F``): 0..1 when every finite value is in [0, 1] (x255), else 0..255 (clipped); NaN -> 0.
    * palette with transparency and ``PA`` go through RGBA; alpha is dropped as ``convert("RGB")`` does
      (``LA``, ``RGBA``, ``RGBa``, ``La``); ``CMYK``, ``YCbCr``, ``1``, ``L`` use PIL's conversion.
    Grayscale is replicated into the three channels.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = a.astype(np.float64)
            finite = a[np.isfinite(a)]
            if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
                a = a * 255.0
            a = np.rint(np.clip(np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0), 0, 255))
        else:
            a = np.clip(a.astype(np.int64), 0, None)
            a = a >> (23 if a.size and a.max() > 65535 else 8)
        img = Image.fromarray(a.astype(np.uint8))
    elif mode == "PA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully (so truncation is detected here) as 8-bit RGB (:func:`to_rgb`)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return to_rgb(img)


class Unreadable(NamedTuple):
    """What an evaluation view returns for a file it could not decode (dropped by :func:`collate_readable`)."""

    path: str


def collate_readable(batch: list) -> tuple[Any, Any, list[str]]:
    """``(images, targets, skipped paths)``: the batch without :class:`Unreadable` items.

    ``images`` and ``targets`` are None when the whole batch was unreadable.
    """
    good = [b for b in batch if not isinstance(b, Unreadable)]
    skipped = [b.path for b in batch if isinstance(b, Unreadable)]
    if not good:
        return None, None, skipped
    images, targets = default_collate(good)[:2]
    return images, targets, skipped


class SafeImageFolder(Dataset):
    """Labelled ImageFolder that survives unreadable files (see the module docstring).

    ``dataset[i]`` is ``(transform(image), target)``, or ``(transform(image), target, bad)`` with
    ``report_bad=True``, where ``bad`` names the files skipped for this sample ("" when none, joined with
    newlines otherwise) so the main process can count bad files over all workers
    (:class:`BadImageTracker`). Without it each worker counts the files it met itself.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        max_bad_fraction: float = 0.001,
        report_bad: bool = False,
    ) -> None:
        self.root = os.fspath(root)
        self.samples, self.classes = scan_image_folder(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.max_bad_fraction = float(max_bad_fraction)
        self.report_bad = report_bad
        self._bad: dict[str, str] = {}  # path -> reason, the files this process found unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, path: str) -> Image.Image | None:
        """The decoded image, or None (recorded, warned about, checked against the limit) if unreadable."""
        if path in self._bad:
            return None
        try:
            return load_rgb(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._bad[path] = reason
            logger.warning("skipping unreadable image %s (%s)", display_path(path), reason)
            check_bad_fraction(len(self._bad), len(self.samples), self.max_bad_fraction, self.root)
            return None

    def load(self, index: int) -> tuple[Image.Image, int, list[str]]:
        """The image at ``index`` or, if unreadable, at the next readable index; plus the skipped paths."""
        skipped: list[str] = []
        n = len(self.samples)
        for attempt in range(n):
            path, target = self.samples[(index + attempt) % n]
            img = self._read(path)
            if img is not None:
                return img, target, skipped
            skipped.append(path)
        raise BadDataError(f"no readable image in {display_path(self.root)!r}")

    def __getitem__(self, index: int):
        img, target, skipped = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        if self.report_bad:
            return img, target, "\n".join(skipped)
        return img, target

    def skipping(self) -> SkippingView:
        """This folder for evaluation: an unreadable file is dropped (:class:`Unreadable`), not replaced."""
        return SkippingView(self)


class SkippingView(Dataset):
    """``view[i] = (transform(image), target)`` of ``folder``'s i-th file, or ``Unreadable(path)``.

    Each index is one distinct file, so a sharded sequential loader (``make_eval_loader``) with
    :func:`collate_readable` counts every readable image exactly once over all ranks.
    """

    def __init__(self, folder: SafeImageFolder) -> None:
        self.folder = folder
        self.root, self.max_bad_fraction = folder.root, folder.max_bad_fraction
        self.classes, self.targets = folder.classes, folder.targets

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path, target = self.folder.samples[index]
        img = self.folder._read(path)
        if img is None:
            return Unreadable(path)
        if self.folder.transform is not None:
            img = self.folder.transform(img)
        return img, target


def check_bad_fraction(num_bad: int, total: int, max_fraction: float, root: str) -> None:
    if num_bad > max_fraction * total:
        raise BadDataError(
            f"{num_bad} of {total} images in {display_path(root)!r} are unreadable, more than "
            f"DATA.MAX_BAD_FRACTION={max_fraction:g}; fix or remove them"
        )


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, index)."""
    return int(
        np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


@contextmanager
def seeded_rng(seed: int, restore: bool = True) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy for the block; the previous global states come back after it.

    Only torch's CPU generator is seeded (``torch.manual_seed`` would also visit every accelerator
    backend, 70x slower): sample transforms run on the CPU. ``restore=False`` leaves the seeded states
    in place: for a loader worker, where every sample reseeds and nothing else draws, saving and
    restoring them (numpy's alone ~90 us) would be a tenth of a 28 px sample's cost.
    """
    if not restore:
        _seed_all(seed)
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        _seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def labelled_split_pair(
    root: str | Path,
    train_split: str,
    val_split: str,
    train_transform: Callable | None,
    val_transform: Callable | None,
    max_bad_fraction: float,
) -> tuple[SafeImageFolder, SafeImageFolder]:
    """``root/train_split`` and ``root/val_split`` as labelled folders that must share their classes."""
    root = Path(root)
    train = SafeImageFolder(root / train_split, train_transform, max_bad_fraction=max_bad_fraction)
    val = SafeImageFolder(root / val_split, val_transform, max_bad_fraction=max_bad_fraction)
    if val.classes != train.classes:
        raise UserError(
            f"DATA.ROOT {str(root)!r}: the class folders of {val_split}/ and {train_split}/ differ "
            f"({len(val.classes)} vs {len(train.classes)} classes)"
        )
    return train, val


def build_eval_transform(
    size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """Resize + CenterCrop + Normalize, the standard evaluation transform (lincls val, kNN)."""
    return transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def build_lincls_train_transform(
    size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> transforms.Compose:
    """RandomResizedCrop + flip + Normalize, the linear-classification training transform."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )
