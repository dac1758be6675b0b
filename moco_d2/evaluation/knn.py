"""Weighted k-nearest-neighbour evaluation of frozen features (Wu et al. 2018, k=200, T=0.07).

Every training image is a memory-bank entry: its L2-normalised global-pooled feature and its label.
A validation image votes with its k most cosine-similar bank entries, each weighted by
exp(similarity / T); the class with the largest summed weight is the prediction.

The similarity is computed in (query chunk x bank chunk) tiles while a running top-k is kept, so
peak memory is query_chunk x (bank_chunk + k) regardless of the bank size (1.28M for ImageNet).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader

from moco_d2.core.backbone import load_backbone
from moco_d2.core.config import default_argument_parser, load_config
from moco_d2.core.distributed import (
    all_reduce_sum,
    cleanup,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
)
from moco_d2.core.errors import UserError, exit_on_user_error
from moco_d2.core.images import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, labelled_split_pair
from moco_d2.core.io import write_json_atomic
from moco_d2.core.metrics import setup_logging
from moco_d2.evaluation.features import (
    cached_split_features,
    extract_features,
    gather_uneven,
    make_eval_loader,
    report_skipped,
    skipped_over_ranks,
    topk_correct,
)

logger = logging.getLogger("moco")

__all__ = [
    "knn_class_scores",
    "knn_defaults",
    "knn_evaluate",
    "knn_on_features",
    "load_backbone_for_knn",
    "run",
]


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


def _bank_dtype(device: torch.device) -> torch.dtype:
    """fp16 storage halves the bank on GPU (1.28M x 2048 -> 5 GB); similarities are computed in fp32 tiles."""
    return torch.float16 if device.type == "cuda" else torch.float32


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
    bank_dtype = _bank_dtype(device)
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
    return _knn_results(
        (bank, bank_labels), (queries, labels), num_classes, k, t, skipped, query_chunk, bank_chunk
    )


def knn_on_features(
    features: dict,
    num_classes: int,
    k: int = 200,
    t: float = 0.07,
    device: torch.device | str = "cpu",
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
) -> dict[str, float]:
    """:func:`knn_evaluate` on features already extracted (``features.split_features``: pooled, not
    normalised, every rank holding all of them); each rank classifies its own share of the queries."""
    device = torch.device(device)
    bank_dtype = _bank_dtype(device)
    rank, world = get_rank(), get_world_size()

    def normalised(name: str, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        feats = F.normalize(features[name][rows].to(device), dim=1).to(bank_dtype)
        return feats, features[f"{name}_labels"][rows].to(device)

    bank, queries = normalised("train", slice(None)), normalised("val", slice(rank, None, world))
    return _knn_results(bank, queries, num_classes, k, t, features["skipped"], query_chunk, bank_chunk)


def _knn_results(
    bank: tuple[torch.Tensor, torch.Tensor],
    queries: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    k: int,
    t: float,
    skipped: list[str],
    query_chunk: int,
    bank_chunk: int,
) -> dict:
    """Top-1/top-5 of this rank's (queries, labels) against the whole (bank, labels), summed over ranks."""
    (bank_feats, bank_labels), (query_feats, labels) = bank, queries
    if bank_feats.shape[0] == 0:
        raise UserError("kNN: no readable image in the memory bank (training split)")
    if query_feats.shape[0]:
        scores = knn_class_scores(
            query_feats, bank_feats, bank_labels, num_classes, k, t, query_chunk, bank_chunk
        )
        hits = topk_correct(scores, labels, ks=(1, 5)).sum(dim=0)
    else:
        hits = torch.zeros(2, device=bank_feats.device)
    n = torch.tensor([query_feats.shape[0]], device=hits.device, dtype=torch.float64)
    top1, top5, n = all_reduce_sum(torch.cat([hits.to(torch.float64), n])).tolist()
    return {
        "top1": 100.0 * top1 / max(n, 1.0),
        "top5": 100.0 * top5 / max(n, 1.0),
        "num_train": int(bank_feats.shape[0]),
        "num_val": int(n),
        "k": min(k, int(bank_feats.shape[0])),
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
    # A file caching both splits' pooled float32 features, shared with the linear probe of the same
    # checkpoint (its DATA.FEATURES_CACHE; ImageNet R50: ~10 GB in host memory). "" = no cache: the bank
    # is extracted straight into normalised (fp16 on CUDA) storage.
    c.DATA.FEATURES_CACHE = ""
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
    model, state = load_backbone(weights, arch)
    model.fc = nn.Identity()
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
    logger.info(
        "kNN (k=%d, T=%g) of %s [%s] on %s", cfg.KNN.K, cfg.KNN.T, cfg.MODEL.WEIGHTS, source, cfg.DATA.ROOT
    )
    knn = cfg.KNN
    if cfg.DATA.FEATURES_CACHE:
        features = cached_split_features(
            model,
            (train, val),
            cfg.DATA,
            cfg.MODEL.WEIGHTS,
            cfg.TRAIN.AMP,
            cfg.DATA.BATCH_SIZE,
            device,
            Path(cfg.DATA.FEATURES_CACHE),
        )
        res = knn_on_features(
            features, len(train.classes), knn.K, knn.T, device, knn.QUERY_CHUNK, knn.BANK_CHUNK
        )
    else:
        loaders = [
            make_eval_loader(d, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_WORKERS, cfg.DATA.PIN_MEMORY)
            for d in (train, val)
        ]
        res = knn_evaluate(
            model, *loaders, len(train.classes), knn.K, knn.T, device, knn.QUERY_CHUNK, knn.BANK_CHUNK,
            amp=cfg.TRAIN.AMP,
        )  # fmt: skip
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
