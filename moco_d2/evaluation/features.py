"""Frozen-feature machinery shared by the kNN monitor, offline kNN and the linear probe.

A ResNet's pooled features (``ResNetTrunk`` when its fc must stay), extracted shard by shard over
processes without padding (``ShardSampler``, ``make_eval_loader``) so every readable image counts once
and unreadable ones are reported (``skipped_over_ranks``, ``report_skipped``), gathered with
``gather_uneven``; ``topk_correct`` scores any classifier's outputs. ``split_features`` extracts both
splits once and caches them in a file (``DATA.FEATURES_CACHE``), so the kNN evaluation and the linear
probe of one checkpoint share one extraction.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from moco_d2.core.distributed import (
    all_gather_cat,
    all_reduce_sum,
    get_rank,
    get_world_size,
    is_main_process,
)
from moco_d2.core.errors import UserError
from moco_d2.core.images import (
    SkippingView,
    Unreadable,
    check_bad_fraction,
    collate_readable,
    display_path,
)
from moco_d2.core.io import atomic_write
from moco_d2.core.metrics import progress

if TYPE_CHECKING:
    from fvcore.common.config import CfgNode

logger = logging.getLogger("moco")

__all__ = [
    "ResNetTrunk",
    "ShardSampler",
    "cached_split_features",
    "eval_batches",
    "extract_features",
    "feature_cache_key",
    "gather_uneven",
    "make_eval_loader",
    "report_skipped",
    "skipped_over_ranks",
    "split_features",
    "topk_correct",
]


class ResNetTrunk(nn.Module):
    """A torchvision ResNet up to (and including) global average pooling; its fc is ignored.

    Lets the pretraining loop hand ``model.encoder_q`` (whose fc is the MLP head) to the kNN monitor
    without copying or modifying it.
    """

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return torch.flatten(r.avgpool(x), 1)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Per-sample hit flags (M x len(ks), float): is the label among the top-k scored classes?"""
    maxk = min(max(ks), scores.shape[1])
    pred = scores.topk(maxk, dim=1).indices
    hit = pred.eq(labels.to(pred.device).view(-1, 1))
    return torch.stack([hit[:, : min(kk, maxk)].any(dim=1) for kk in ks], dim=1).float()


class ShardSampler(Sampler[int]):
    """Rank r reads indices r, r + W, r + 2W, ... in order: every sample exactly once over all ranks.

    Unlike DistributedSampler it never pads with duplicates, so gathered features and summed hit
    counts are exact.
    """

    def __init__(self, data: Sized, rank: int | None = None, world_size: int | None = None) -> None:
        self.n = len(data)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def make_eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 4, pin_memory: bool = True
) -> DataLoader:
    """Sequential, sharded, non-padded loader for feature extraction (kNN bank/queries, validation).

    Batches are ``(images, targets, skipped paths)``. An image folder (``SafeImageFolder``) is read
    through its :meth:`~moco_d2.core.images.SafeImageFolder.skipping` view: an unreadable file is
    dropped and reported, never replaced by another image, so every distinct readable image counts once.
    """
    if hasattr(dataset, "skipping"):
        dataset = dataset.skipping()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(dataset),
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=False,
        drop_last=False,
        collate_fn=collate_readable,
    )


def eval_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, list[str]]]:
    """``(images, targets, skipped)`` from a ``make_eval_loader`` loader, or from a plain 2-tuple loader."""
    for batch in loader:
        if len(batch) == 3:
            yield batch
        else:
            yield batch[0], batch[1], []


def skipped_over_ranks(skipped: list[str], loader: DataLoader | None = None) -> list[str]:
    """The unreadable files skipped by every rank (sorted); checked against the dataset's bad-file limit.

    Each rank only counts the files of its own shard (and, with loader workers, each worker its own),
    so the limit (``DATA.MAX_BAD_FRACTION``) is checked here again on the total.
    """
    names = list(skipped)
    if get_world_size() > 1:
        parts: list[list[str] | None] = [None] * get_world_size()
        torch.distributed.all_gather_object(parts, names)
        names = [n for p in parts for n in (p or [])]
    names = sorted(set(names))
    dataset = getattr(loader, "dataset", None)
    if names and isinstance(dataset, SkippingView):
        check_bad_fraction(len(names), len(dataset), dataset.max_bad_fraction, dataset.root)
    return names


def report_skipped(what: str, names: list[str], limit: int = 20) -> dict:
    """Results fields for skipped files (``num_skipped`` and at most ``limit`` names), also logged."""
    shown = [display_path(n) for n in names[:limit]]
    if names and is_main_process():
        logger.warning(
            "%s: %d unreadable image(s) skipped and not counted: %s%s",
            what,
            len(names),
            ", ".join(shown),
            " ..." if len(names) > limit else "",
        )
    return {"num_skipped": len(names), "skipped": shown}


@torch.no_grad()
def gather_uneven(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` over ranks along dim 0 when ranks hold different numbers of rows."""
    if get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    counts = all_gather_cat(n).tolist()
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = all_gather_cat(padded).split(max(counts))
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    feature_dtype: torch.dtype = torch.float32,
    amp: bool = False,
    desc: str = "features",
    skipped: list[str] | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (L2-normalised unless ``normalize`` is False) and labels of this rank's share of
    ``loader`` (model in eval mode).

    ``amp`` runs the model in bf16 on CUDA: faster, but features then carry ~3 significant digits.
    Unreadable files (dropped by ``make_eval_loader``) are appended to ``skipped`` when it is given.
    """
    use_amp = amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    feats, labels = [], []
    bar = progress(eval_batches(loader), total=len(loader), desc=desc, enabled=is_main_process())
    for images, target, bad in bar:
        if skipped is not None:
            skipped.extend(bad)
        if images is None:  # the whole batch was unreadable
            continue
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            f = model(images)
        f = f.float().flatten(1)
        feats.append((F.normalize(f, dim=1) if normalize else f).to(feature_dtype))
        labels.append(target.to(device, torch.long))
    bar.close()
    if not feats:  # a rank with no samples (tiny set, many ranks) still joins the gathers
        dim = _output_dim(model, loader, device)
        return torch.empty(0, dim, dtype=feature_dtype, device=device), torch.empty(
            0, dtype=torch.long, device=device
        )
    return torch.cat(feats), torch.cat(labels)


def _output_dim(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    for i in range(len(loader.dataset)):
        item = loader.dataset[i]
        if not isinstance(item, Unreadable):
            return model(item[0].unsqueeze(0).to(device)).flatten(1).shape[1]
    root = getattr(loader.dataset, "root", "the dataset")
    raise UserError(f"no readable image in {display_path(str(root))!r}")


# ----------------------------------------------------------------------------------------------------
# Both splits' frozen features, extracted once and cached in a file (DATA.FEATURES_CACHE)


def feature_cache_key(weights: str, data: CfgNode, amp: bool) -> str:
    """Everything the frozen features of ``data``'s two splits depend on: the checkpoint's bytes (not its
    name: a checkpoint rewritten in place is another key), the image folders, the eval transform, AMP.

    ``data`` is a kNN or linear-probe config's DATA node; both name these keys alike.
    """
    with open(weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    fields = (data.ROOT, data.TRAIN_SPLIT, data.VAL_SPLIT, data.CROP_SIZE, data.RESIZE)
    return json.dumps([digest, *fields, list(data.MEAN), list(data.STD), bool(amp)])


def _load_cache(path: Path | None, key: str) -> dict | None:
    """The cache at ``path`` if its key is ``key`` (None when absent, stale or unreadable)."""
    if path is None or not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file is a miss, never a crash: it is rewritten
        logger.warning("feature cache %s unreadable (%s): extracting again", display_path(str(path)), e)
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


@torch.no_grad()
def split_features(
    trunk: nn.Module,
    splits: dict[str, Dataset],
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    device: torch.device,
    amp: bool = False,
    cache: Path | None = None,
    key: str = "",
) -> dict:
    """Pooled (not normalised) float32 features of every split, gathered over ranks, on the CPU.

    Returns ``{"key", <split>: N x D, "<split>_labels": N, "skipped": [unreadable files]}``. With
    ``cache``, a file holding the same ``key`` is read instead of touching an image, and a fresh
    extraction is written there (atomically, by the main process). Every rank must hit for any to use
    it, so ranks without a shared file system extract together rather than wait on each other.
    """
    cached = _load_cache(cache, key)
    if all_reduce_sum(torch.tensor([float(cached is None)], device=device)).item() == 0:
        return cached
    out: dict = {"key": key, "skipped": []}
    for name, dataset in splits.items():
        loader = make_eval_loader(dataset, batch_size, num_workers, pin_memory)
        bad: list[str] = []
        feats, labels = extract_features(
            trunk, loader, device, amp=amp, desc=f"{name} features", skipped=bad, normalize=False
        )
        out[name], out[f"{name}_labels"] = gather_uneven(feats).cpu(), gather_uneven(labels).cpu()
        out["skipped"] += skipped_over_ranks(bad, loader)
    if cache is not None and is_main_process():
        atomic_write(cache, lambda f: torch.save(out, f), what="feature cache")
    return out


def cached_split_features(
    model: nn.Module,
    datasets: tuple[Dataset, Dataset],
    data: CfgNode,
    weights: str,
    amp: bool,
    batch_size: int,
    device: torch.device,
    cache: Path,
) -> dict:
    """``split_features`` of a config's (train, val) splits through ``model``'s trunk, cached in ``cache``
    under ``feature_cache_key``: the one call the kNN evaluation and the linear probe share, so both
    write and read the same file for the same checkpoint, images and transform."""
    return split_features(
        ResNetTrunk(model).eval(),
        dict(zip(("train", "val"), datasets)),
        batch_size,
        data.NUM_WORKERS,
        data.PIN_MEMORY,
        device,
        amp,
        cache,
        feature_cache_key(weights, data, amp),
    )
