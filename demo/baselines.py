"""The two reference points that need no training: a randomly initialised backbone and raw pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moco_d2.core.backbone import build_resnet
from moco_d2.core.io import save_atomic
from moco_d2.evaluation.knn import knn_class_scores


def write_random_init(path: Path, arch: str, seed: int) -> None:
    """torchvision's default initialisation of ``arch`` under ``seed``, as a plain state dict.

    A plain torchvision state dict is one of the checkpoint formats every tool reads, so the
    random-init row goes through exactly the kNN / linear-evaluation code paths of the others.
    """
    torch.manual_seed(seed)
    model = build_resnet(arch)
    save_atomic(model.state_dict(), path)


def _load_split(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images of an ImageFolder split as flat float vectors, with their class indices."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.png")):
            xs.append(np.asarray(Image.open(f).convert("L"), dtype=np.float32).ravel())
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def raw_pixel_knn(imagefolder: Path, k: int, t: float, out_json: Path) -> dict:
    """Weighted kNN (same rule and k, T as the feature kNN) on L2-normalised raw pixels.

    An honest floor: a feature extractor is only useful here if its kNN accuracy beats this.
    """
    xtr, ytr = _load_split(imagefolder / "train")
    xva, yva = _load_split(imagefolder / "val")

    def normalise(x: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.from_numpy(x), dim=1)

    scores = knn_class_scores(
        normalise(xva), normalise(xtr), torch.from_numpy(ytr), int(ytr.max()) + 1, k=k, t=t
    )
    top1 = (scores.argmax(1).numpy() == yva).mean() * 100.0
    result = {"top1": float(top1), "k": k, "t": t, "bank": len(ytr), "queries": len(yva)}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    return result
