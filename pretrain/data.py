"""Pretraining data: per-sample seeded two-view augmentation and exact-resume batch sampling.

* :class:`PretrainDataset` draws a sample's two views inside an RNG seeded by (seed, epoch, index), so
  the augmentation is a pure function of those three numbers: independent of the number of loader
  workers, of which worker gets a sample and of whether the run was resumed.
* :class:`EpochBatchSampler` gives every rank its slice of a (seed, epoch)-seeded permutation, one
  global batch at a time, and can start in the middle of an epoch (exact mid-epoch resume).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info

from moco_d2.core.errors import UserError
from moco_d2.core.images import SafeImageFolder, check_bad_fraction, mix_seed, seeded_rng

logger = logging.getLogger("moco")


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
        # a loader worker need not restore its global RNG states: only these samples draw from them
        with seeded_rng(mix_seed(self.seed, SAMPLE_STREAM, epoch, index), restore=get_worker_info() is None):
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
