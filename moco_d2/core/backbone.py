"""Read a ResNet backbone out of any checkpoint this project meets, in torchvision's key names.

One place knows the formats, so linear evaluation, kNN and the Detectron2 converter agree on them:

* this project's MoCo pretraining checkpoints and the official MoCo ones
  (``{"state_dict": {"module.encoder_q.*", "module.encoder_k.*", "module.queue", ...}}``):
  the query encoder, projection head dropped;
* this project's (and the official) linear-classification / supervised checkpoints
  (``{"state_dict": {"module.conv1.weight", ..., "module.fc.*"}}``): fc dropped;
* plain torchvision ResNet state dicts, with or without a ``module.`` prefix: fc dropped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from moco_d2.core.errors import UserError
from moco_d2.core.io import load_checkpoint

# (block type, blocks per stage) -> torchvision constructor name, for the stock widths.
_ARCHS = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}

SOURCE_MOCO_OURS = "MoCo pretraining checkpoint (this project)"
SOURCE_MOCO_OFFICIAL = "MoCo pretraining checkpoint (official format)"
SOURCE_LINCLS_OURS = "classification checkpoint (this project)"
SOURCE_LINCLS_OFFICIAL = "classification checkpoint (official lincls format)"
SOURCE_TORCHVISION = "torchvision ResNet state dict"


@dataclass
class BackboneState:
    state_dict: dict[str, torch.Tensor]
    source: str
    arch: str | None
    meta: dict = field(default_factory=dict)  # epoch, kind, ... when the checkpoint says


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _is_resnet(sd: dict) -> bool:
    return "conv1.weight" in sd and any(k.startswith("layer4.") for k in sd)


def extract_resnet_state(ckpt: dict, name: str = "checkpoint") -> BackboneState:
    """Recognise ``ckpt``'s format and return its ResNet backbone (no fc, no prefix)."""
    if not isinstance(ckpt, dict):
        raise UserError(f"{name} holds a {type(ckpt).__name__}, expected a dict of tensors")
    meta = {k: ckpt[k] for k in ("epoch", "arch", "kind", "best_acc1") if k in ckpt}
    inner = ckpt.get("state_dict", ckpt.get("model") if isinstance(ckpt.get("model"), dict) else None)
    candidates: list[tuple[dict, str]] = []
    if isinstance(inner, dict):
        for prefix in ("module.encoder_q.", "encoder_q."):
            sd = _strip(inner, prefix)
            if _is_resnet(sd):
                ours = ckpt.get("kind") == "moco"
                candidates.append((sd, SOURCE_MOCO_OURS if ours else SOURCE_MOCO_OFFICIAL))
                break
        else:
            for prefix in ("module.", ""):
                sd = _strip(inner, prefix)
                if _is_resnet(sd):
                    ours = ckpt.get("kind") in ("lincls", "supervised")
                    candidates.append((sd, SOURCE_LINCLS_OURS if ours else SOURCE_LINCLS_OFFICIAL))
                    break
    if not candidates:
        tensors = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
        for prefix in ("module.", ""):
            sd = _strip(tensors, prefix)
            if _is_resnet(sd):
                candidates.append((sd, SOURCE_TORCHVISION))
                break
    if not candidates:
        keys = list((inner if isinstance(inner, dict) else ckpt).keys())[:5]
        raise UserError(
            f"{name} holds no ResNet encoder weights (expected 'module.encoder_q.conv1.weight', "
            f"'module.conv1.weight' or 'conv1.weight'; first keys: {keys})"
        )
    sd, source = candidates[0]
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and isinstance(v, torch.Tensor)}
    arch = infer_resnet_arch(sd)
    if isinstance(meta.get("arch"), str) and arch is not None and meta["arch"] != arch:
        raise UserError(f"{name} says arch {meta['arch']!r} but its weights are a {arch}")
    return BackboneState(state_dict=sd, source=source, arch=arch or meta.get("arch"), meta=meta)


def load_resnet_state(path: str | os.PathLike) -> BackboneState:
    """Load ``path`` safely (weights only) and extract its ResNet backbone."""
    return extract_resnet_state(load_checkpoint(path), name=f"checkpoint {str(path)!r}")


def infer_resnet_arch(sd: dict[str, torch.Tensor]) -> str | None:
    """Name the torchvision ResNet whose structure ``sd`` has, or None for a non-stock variant."""
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(idx))
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    name = _ARCHS.get((block, tuple(counts)))
    if name is None or block == "basic":
        return name
    conv2 = sd["layer1.0.conv2.weight"]
    width = conv2.shape[0]
    groups = width // conv2.shape[1]
    if groups == 1 and width == 64:
        return name
    if groups == 1 and width == 128 and name in ("resnet50", "resnet101"):
        return f"wide_{name}_2"
    if groups == 32 and name == "resnet50" and width == 128:
        return "resnext50_32x4d"
    if groups == 32 and name == "resnet101" and width == 256:
        return "resnext101_32x8d"
    return None


def check_arch(state: BackboneState, expected: str, name: str = "checkpoint") -> None:
    """UserError unless the backbone is the ``expected`` torchvision ResNet."""
    if state.arch != expected:
        raise UserError(f"{name} holds a {state.arch or 'non-standard ResNet'} backbone, expected {expected}")
