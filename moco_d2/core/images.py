"""Labelled image folders, seeding and evaluation transforms, shared by pretraining and evaluation.

* :class:`SafeImageFolder` is a labelled ImageFolder (same classes/targets as torchvision's) that
  reports bad data in one line: a missing root, a class folder without images, no images at all.
  Unreadable or corrupt files are skipped (the next readable index is used instead, deterministically),
  named in a warning and counted; past ``max_bad_fraction`` of the dataset it stops with a clear error.
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
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
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


def scan_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of an ImageFolder ``root/<class>/**/<image>``; classes sorted by name."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"image folder {root!r} does not exist (expected {root}/<class>/<image>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {root!r} has no class folders (expected {root}/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames.sort()
            found.extend(
                os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)
            )
        if not found:
            raise UserError(
                f"class folder {class_dir!r} has no images (looked for {', '.join(IMG_EXTENSIONS)})"
            )
        samples.extend((path, idx) for path in found)
    return samples, classes


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully (so truncation is detected here) as RGB; grayscale is replicated."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
        return img.convert("RGB")


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

    def load(self, index: int) -> tuple[Image.Image, int, list[str]]:
        """The image at ``index`` or, if unreadable, at the next readable index; plus the skipped paths."""
        skipped: list[str] = []
        n = len(self.samples)
        for attempt in range(n):
            path, target = self.samples[(index + attempt) % n]
            if path in self._bad:
                skipped.append(path)
                continue
            try:
                return load_rgb(path), target, skipped
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._bad[path] = reason
                skipped.append(path)
                logger.warning("skipping unreadable image %s (%s); using the next readable one", path, reason)
                check_bad_fraction(len(self._bad), n, self.max_bad_fraction, self.root)
        raise BadDataError(f"no readable image in {self.root!r}")

    def __getitem__(self, index: int):
        img, target, skipped = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        if self.report_bad:
            return img, target, "\n".join(skipped)
        return img, target


def check_bad_fraction(num_bad: int, total: int, max_fraction: float, root: str) -> None:
    if num_bad > max_fraction * total:
        raise BadDataError(
            f"{num_bad} of {total} images in {root!r} are unreadable, more than "
            f"DATA.MAX_BAD_FRACTION={max_fraction:g}; fix or remove them"
        )


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, index)."""
    return int(
        np.random.SeedSequence([int(v) for v in values]).generate_state(2, np.uint64)[0] >> np.uint64(1)
    )


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy for the block; the previous global states come back after it.

    Only torch's CPU generator is seeded (``torch.manual_seed`` would also visit every accelerator
    backend, 70x slower): sample transforms run on the CPU.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
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
