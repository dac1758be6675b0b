"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018, k=200, T=0.07).

Every training image is a memory-bank entry: its L2-normalised global-pooled feature and its label.
A validation image votes with its k most cosine-similar bank entries, each weighted by
exp(similarity / T); the class with the largest summed weight is the prediction.

The similarity is computed in (query chunk x bank chunk) tiles while a running top-k is kept, so
peak memory is query_chunk x (bank_chunk + k) regardless of the bank size (1.28M for ImageNet).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sized
from pathlib import Path

import torch
import torch.nn.functional as F
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from moco_d2.core.backbone import build_resnet, load_resnet_state
from moco_d2.core.config import default_argument_parser, load_config
from moco_d2.core.distributed import (
    all_gather_cat,
    all_reduce_sum,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from moco_d2.core.errors import UserError, exit_on_user_error
from moco_d2.core.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SkippingView,
    Unreadable,
    build_eval_transform,
    check_bad_fraction,
    collate_readable,
    display_path,
    labelled_split_pair,
)
from moco_d2.core.io import write_json_atomic
from moco_d2.core.metrics import progress, setup_logging

logger = logging.getLogger("moco")

__all__ = [
    "ResNetTrunk",
    "ShardSampler",
    "eval_batches",
    "extract_features",
    "gather_uneven",
    "knn_class_scores",
    "knn_defaults",
    "knn_evaluate",
    "make_eval_loader",
    "skipped_over_ranks",
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


@torch.no_grad()
def knn_class_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.07,
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
) -> torch.Tensor:
    """Weighted-kNN class scores (M x num_classes, float32) of L2-normalised ``queries`` (M x D).

    ``bank`` (N x D) must be L2-normalised too; ``bank_labels`` (N,) are int64 class ids.
    k is clipped to N. Only query_chunk x (bank_chunk + k) similarities exist at any time.
    """
    if bank.shape[0] == 0:
        raise ValueError("kNN: the feature bank is empty")
    if k < 1 or t <= 0:
        raise ValueError(f"kNN: need k >= 1 and t > 0, got k={k}, t={t}")
    k = min(k, bank.shape[0])
    bank_labels = bank_labels.to(bank.device, torch.long)
    out = torch.empty(queries.shape[0], num_classes, dtype=torch.float32, device=queries.device)
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0 : q0 + query_chunk].to(bank.device, torch.float32)
        best_sim = torch.full((q.shape[0], 0), float("-inf"), device=bank.device)
        best_idx = torch.empty((q.shape[0], 0), dtype=torch.long, device=bank.device)
        for b0 in range(0, bank.shape[0], bank_chunk):
            # Features may be stored in fp16; similarities are always computed in fp32.
            sim = q @ bank[b0 : b0 + bank_chunk].float().T
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            # Merge this tile's candidates with the running top-k.
            cand_sim = torch.cat([best_sim, top_sim], dim=1)
            cand_idx = torch.cat([best_idx, top_idx + b0], dim=1)
            best_sim, pos = cand_sim.topk(min(k, cand_sim.shape[1]), dim=1)
            best_idx = cand_idx.gather(1, pos)
        weights = (best_sim / t).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device)
        scores.scatter_add_(1, bank_labels[best_idx], weights)
        out[q0 : q0 + q.shape[0]] = scores.to(out.device)
    return out


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of this rank's share of ``loader`` (model in eval mode).

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
        feats.append(F.normalize(f.float().flatten(1), dim=1).to(feature_dtype))
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


@torch.no_grad()
def knn_evaluate(
    backbone: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_classes: int,
    k: int = 200,
    t: float = 0.07,
    device: torch.device | str | None = None,
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
    amp: bool = False,
) -> dict[str, float]:
    """Weighted-kNN top-1/top-5 (percent) of ``backbone``'s pooled features; distributed-aware.

    ``backbone`` maps images to pooled features (a ResNet with fc=Identity, or ``ResNetTrunk``).
    Each rank extracts its shard of both loaders (use ``make_eval_loader``: no padding, exact counts);
    the training features are gathered on every rank, each rank classifies its own validation shard,
    and hit counts are summed. The backbone's train/eval mode is restored afterwards.
    ``num_train`` / ``num_val`` count distinct readable images; unreadable ones are left out and
    reported in ``num_skipped`` / ``skipped`` (at most 20 names).
    """
    if device is None:
        device = next(backbone.parameters()).device
    device = torch.device(device)
    # fp16 storage halves the bank on GPU (1.28M x 2048 -> 5 GB); similarities are computed in fp32 tiles.
    bank_dtype = torch.float16 if device.type == "cuda" else torch.float32
    was_training = backbone.training
    backbone.eval()
    bad_train: list[str] = []
    bad_val: list[str] = []
    try:
        bank, bank_labels = extract_features(
            backbone, train_loader, device, bank_dtype, amp, "kNN bank", bad_train
        )
        bank, bank_labels = gather_uneven(bank), gather_uneven(bank_labels)
        queries, labels = extract_features(
            backbone, val_loader, device, bank_dtype, amp, "kNN queries", bad_val
        )
    finally:
        backbone.train(was_training)
    skipped = skipped_over_ranks(bad_train, train_loader) + skipped_over_ranks(bad_val, val_loader)
    if bank.shape[0] == 0:
        raise UserError("kNN: no readable image in the memory bank (training split)")
    if queries.shape[0]:
        scores = knn_class_scores(queries, bank, bank_labels, num_classes, k, t, query_chunk, bank_chunk)
        hits = topk_correct(scores, labels, ks=(1, 5)).sum(dim=0)
    else:
        hits = torch.zeros(2, device=device)
    totals = all_reduce_sum(
        torch.cat(
            [
                hits.to(device, torch.float64),
                torch.tensor([queries.shape[0]], device=device, dtype=torch.float64),
            ]
        )
    )
    top1, top5, n = totals.tolist()
    return {
        "top1": 100.0 * top1 / max(n, 1.0),
        "top5": 100.0 * top5 / max(n, 1.0),
        "num_train": int(bank.shape[0]),
        "num_val": int(n),
        "k": min(k, int(bank.shape[0])),
        "t": float(t),
        **report_skipped("kNN", skipped),
    }


# ----------------------------------------------------------------------------------------------------
# Offline evaluation of a checkpoint: python -m moco_d2.evaluation.knn --config-file ... MODEL.WEIGHTS ckpt ...


def knn_defaults() -> CfgNode:
    """Offline kNN: ImageNet train/ as the bank, val/ as queries, Resize(256) + CenterCrop(224)."""
    c = CfgNode()
    c.OUTPUT_DIR = "output/knn"
    c.MODEL = CfgNode()
    c.MODEL.ARCH = ""  # "" = whatever the checkpoint holds; otherwise it must match
    c.MODEL.WEIGHTS = ""  # checkpoint to evaluate (ours, official MoCo, lincls, torchvision)
    c.DATA = CfgNode()
    c.DATA.ROOT = "datasets/imagenet"
    c.DATA.TRAIN_SPLIT = "train"  # memory bank
    c.DATA.VAL_SPLIT = "val"  # queries
    c.DATA.CROP_SIZE = 224
    c.DATA.RESIZE = 256
    c.DATA.MEAN = list(IMAGENET_MEAN)
    c.DATA.STD = list(IMAGENET_STD)
    c.DATA.BATCH_SIZE = 256  # per process
    c.DATA.NUM_WORKERS = 8  # per process
    c.DATA.PIN_MEMORY = True
    c.DATA.MAX_BAD_FRACTION = 0.001
    c.KNN = CfgNode()
    c.KNN.K = 200
    c.KNN.T = 0.07
    c.KNN.QUERY_CHUNK = 1024  # queries per similarity tile
    c.KNN.BANK_CHUNK = 65536  # bank entries per similarity tile
    c.TRAIN = CfgNode()
    c.TRAIN.DEVICE = "auto"
    c.TRAIN.AMP = False  # bf16 feature extraction on CUDA (faster, less exact features)
    return c


def load_backbone_for_knn(weights: str, arch: str = "") -> tuple[nn.Module, str, str]:
    """A torchvision ResNet with fc=Identity holding ``weights``' encoder; returns (model, arch, source)."""
    if not weights:
        raise UserError("MODEL.WEIGHTS is empty: give the checkpoint to evaluate")
    state = load_resnet_state(weights)
    if state.arch is None:
        raise UserError(
            f"MODEL.WEIGHTS {weights!r} holds a non-standard ResNet; no torchvision constructor fits"
        )
    if arch and arch != state.arch:
        raise UserError(f"MODEL.WEIGHTS {weights!r} holds a {state.arch} backbone but MODEL.ARCH is {arch!r}")
    model = build_resnet(state.arch)
    model.fc = nn.Identity()
    missing, unexpected = model.load_state_dict(state.state_dict, strict=False)
    if missing or unexpected:
        raise UserError(
            f"MODEL.WEIGHTS {weights!r} does not fit a {state.arch}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return model, state.arch, state.source


def run(cfg: CfgNode, device: torch.device) -> dict:
    """Evaluate ``cfg.MODEL.WEIGHTS`` and write OUTPUT_DIR/knn_results.json (main process)."""
    if cfg.KNN.K < 1 or cfg.KNN.T <= 0:
        raise UserError(f"KNN.K must be >= 1 and KNN.T > 0, got {cfg.KNN.K} and {cfg.KNN.T}")
    if cfg.DATA.NUM_WORKERS < 0 or cfg.DATA.BATCH_SIZE < 1:
        raise UserError(
            f"need DATA.NUM_WORKERS >= 0 and DATA.BATCH_SIZE >= 1, got {cfg.DATA.NUM_WORKERS} and {cfg.DATA.BATCH_SIZE}"
        )
    if cfg.DATA.CROP_SIZE < 1 or cfg.DATA.RESIZE < cfg.DATA.CROP_SIZE:
        raise UserError(
            f"DATA.RESIZE ({cfg.DATA.RESIZE}) must be >= DATA.CROP_SIZE ({cfg.DATA.CROP_SIZE}) >= 1"
        )
    model, arch, source = load_backbone_for_knn(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH)
    model.to(device)
    tf = build_eval_transform(cfg.DATA.CROP_SIZE, cfg.DATA.RESIZE, cfg.DATA.MEAN, cfg.DATA.STD)
    train, val = labelled_split_pair(
        cfg.DATA.ROOT, cfg.DATA.TRAIN_SPLIT, cfg.DATA.VAL_SPLIT, tf, tf, cfg.DATA.MAX_BAD_FRACTION
    )
    loaders = [
        make_eval_loader(d, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS, cfg.DATA.PIN_MEMORY)
        for d in (train, val)
    ]
    logger.info(
        "kNN (k=%d, T=%g) of %s [%s] on %s", cfg.KNN.K, cfg.KNN.T, cfg.MODEL.WEIGHTS, source, cfg.DATA.ROOT
    )
    res = knn_evaluate(
        model,
        *loaders,
        len(train.classes),
        cfg.KNN.K,
        cfg.KNN.T,
        device,
        cfg.KNN.QUERY_CHUNK,
        cfg.KNN.BANK_CHUNK,
        amp=cfg.TRAIN.AMP,
    )
    res.update(checkpoint=cfg.MODEL.WEIGHTS, arch=arch, source=source, num_classes=len(train.classes))
    if is_main_process():
        path = write_json_atomic(res, Path(cfg.OUTPUT_DIR) / "knn_results.json")
        logger.info("kNN top1 %.2f top5 %.2f -> %s", res["top1"], res["top5"], path)
    return res


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = default_argument_parser("Weighted kNN evaluation of a checkpoint's frozen features").parse_args(
        argv
    )
    cfg = load_config(knn_defaults(), args.config_file, args.opts)
    info = init_distributed(cfg.TRAIN.DEVICE)
    setup_logging(cfg.OUTPUT_DIR, info.rank)
    try:
        return run(cfg, info.device)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
