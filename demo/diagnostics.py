"""How many directions each backbone's features use on the detection scenes (effective rank).

A detector fine-tuned for a few hundred iterations can only build on what the backbone's res4 features
already separate. The effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised squared
singular values of the centred position x channel feature matrix) measures that in one number: it is
k for k equal singular values and at most the channel count. It explains rows that transfer worse than
their classification accuracy suggests, e.g. a supervised backbone trained on only 10 labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from moco_d2.core.backbone import load_backbone
from moco_d2.core.images import IMAGENET_MEAN, IMAGENET_STD
from moco_d2.core.io import write_json_atomic

STAGES = {"layer3": "res4", "layer4": "res5"}  # torchvision ResNet modules -> Detectron2 names


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank of an N x C matrix of feature vectors (rows), after centring each channel."""
    x = features.double()
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    p = s**2 / (s**2).sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def scene_batch(voc_root: Path, split: str, count: int, size: int) -> torch.Tensor:
    """The first ``count`` scenes of ``split``: short side resized to ``size``, centre square, normalised
    as the detector's input (RGB, ImageNet mean and std)."""
    ids = (voc_root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:count]
    images = []
    for i in ids:
        img = Image.open(voc_root / "JPEGImages" / f"{i}.jpg").convert("RGB")
        x = TF.center_crop(TF.resize(TF.to_tensor(img), size, antialias=True), [size, size])
        images.append(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(images)


@torch.no_grad()
def backbone_ranks(weights: str | os.PathLike, arch: str, scenes: torch.Tensor, batch: int = 16) -> dict:
    """Effective rank of the res4 and res5 outputs over every position of ``scenes``.

    BN runs in training mode (batch statistics), as while the detector is fine-tuned.
    """
    model, _ = load_backbone(weights, arch, name="backbone")
    model.train()
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in STAGES.values()}
    for chunk in scenes.split(batch):
        h = model.maxpool(model.relu(model.bn1(model.conv1(chunk))))
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(model, layer)(h)
            if layer in STAGES:  # every position becomes one row of channel values
                feats[STAGES[layer]].append(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]))
    return {
        name: {"effective_rank": effective_rank(torch.cat(f)), "channels": f[0].shape[1]}
        for name, f in feats.items()
    }


def write_feature_ranks(
    backbones: dict[str, Path], arch: str, voc_root: Path, out_json: Path, count: int = 64, size: int = 160
) -> dict:
    """Ranks for every row's backbone on the test scenes, written atomically to ``out_json``."""
    torch.manual_seed(0)
    scenes = scene_batch(voc_root, "test", count, size)
    result = {
        "scenes": int(scenes.shape[0]),
        "size": size,
        "rows": {row: backbone_ranks(path, arch, scenes) for row, path in backbones.items()},
    }
    write_json_atomic(result, out_json)
    return result
