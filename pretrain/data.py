"""Image-folder data for pretraining and evaluation: robust loading, per-sample seeded augmentation.

* :class:`SafeImageFolder` is a labelled ImageFolder (same classes/targets as torchvision's) that
  reports bad data in one line: a missing root, a class folder without images, no images at all.
  Unreadable or corrupt files are skipped (the next readable index is used instead, deterministically),
  named in a warning and counted; past ``max_bad_fraction`` of the dataset it stops with a clear error.
* :class:`PretrainDataset` draws a sample's two views inside an RNG seeded by (seed, epoch, index), so
  the augmentation is a pure function of those three numbers: independent of the number of loader
  workers, of which worker gets a sample and of whether the run was resumed.
* :class:`EpochBatchSampler` gives every rank its slice of a (seed, epoch)-seeded permutation, one
  global batch at a time, and can start in the middle of an epoch (exact mid-epoch resume).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from pretrain.errors import UserError

logger = logging.getLogger("moco")

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


class BadImageTracker:
    """Main-process count of distinct unreadable files reported by every worker (``report_bad=True``)."""

    def __init__(self, total: int, max_fraction: float, root: str) -> None:
        self.total, self.max_fraction, self.root = total, max_fraction, root
        self.bad: set[str] = set()

    def update(self, reports: list[str]) -> None:
        new = {p for r in reports if r for p in r.split("\n")} - self.bad
        if not new:
            return
        self.bad |= new
        logger.warning(
            "%d unreadable image(s) skipped so far (%d new: %s)",
            len(self.bad),
            len(new),
            ", ".join(sorted(new)[:10]) + (" ..." if len(new) > 10 else ""),
        )
        check_bad_fraction(len(self.bad), self.total, self.max_fraction, self.root)


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


SAMPLE_STREAM = 1  # domain separation between the seeds derived from SEED
SAMPLER_STREAM = 2


class PretrainDataset(Dataset):
    """``dataset[(epoch, index)] = (view_q, view_k, skipped_files)`` with seeded augmentation."""

    def __init__(self, images: SafeImageFolder, transform: Callable[[Image.Image], Any], seed: int) -> None:
        self.images, self.transform, self.seed = images, transform, int(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        img, _, skipped = self.images.load(index)
        with seeded_rng(mix_seed(self.seed, SAMPLE_STREAM, epoch, index)):
            view_q, view_k = self.transform(img)
        return view_q, view_k, "\n".join(skipped)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for one rank; the tail that does not fill a global batch is dropped.

    Step ``s`` of an epoch uses positions ``[s*B, (s+1)*B)`` of the epoch's permutation (B = global
    batch); rank ``r`` takes the r-th contiguous slice of it. So the global batch at every step is the same
    for any number of processes, and ``set_epoch(e, start_step)`` resumes exactly in the middle of an epoch.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise UserError(
                f"SOLVER.BATCH_SIZE={global_batch} must be divisible by the number of processes {world_size}"
            )
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {num_samples} images, fewer than one global batch (SOLVER.BATCH_SIZE={global_batch})"
            )
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, SAMPLER_STREAM, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, i) for i in perm[start : start + self.local_batch]]


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
