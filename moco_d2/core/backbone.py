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
import torchvision

from moco_d2.core.errors import UserError
from moco_d2.core.io import load_checkpoint

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@dataclass(frozen=True)
class ArchSpec:
    """One torchvision ResNet: what Detectron2's ResNet config needs to rebuild it, and its structure."""

    depth: int
    num_groups: int = 1
    width_per_group: int = 64

    @property
    def basic_block(self) -> bool:
        return self.depth in (18, 34)

    @property
    def block(self) -> str:
        return "basic" if self.basic_block else "bottleneck"

    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return STAGE_BLOCKS[self.depth]

    @property
    def res2_width(self) -> int:
        """Output channels of the first block's 3x3 conv (groups x width per group)."""
        return self.num_groups * self.width_per_group

    @property
    def res2_out_channels(self) -> int:
        # BasicBlock stages keep 64 channels in res2; Bottleneck stages expand them 4x.
        return 64 if self.basic_block else 256

    @property
    def stock(self) -> bool:
        """Plain ResNet widths (no groups, no widening): the encoders MoCo pretraining builds."""
        return self.num_groups == 1 and self.width_per_group == 64


# THE architecture table: torchvision constructor name -> structure. Everything else derives from it.
ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(18),
    "resnet34": ArchSpec(34),
    "resnet50": ArchSpec(50),
    "resnet101": ArchSpec(101),
    "resnet152": ArchSpec(152),
    "resnext50_32x4d": ArchSpec(50, num_groups=32, width_per_group=4),
    "resnext101_32x8d": ArchSpec(101, num_groups=32, width_per_group=8),
    "wide_resnet50_2": ArchSpec(50, width_per_group=128),
    "wide_resnet101_2": ArchSpec(101, width_per_group=128),
}
PRETRAIN_ARCHS = tuple(name for name, spec in ARCHS.items() if spec.stock)


def check_pretrain_arch(arch: str, key: str = "MODEL.ARCH") -> None:
    """One-line UserError unless MoCo pretraining can build ``arch``."""
    if arch not in PRETRAIN_ARCHS:
        raise UserError(
            f"{key} {arch!r} is not a torchvision ResNet that pretraining builds ({', '.join(PRETRAIN_ARCHS)})"
        )


def reference_shapes(arch: str) -> dict[str, torch.Size]:
    """Tensor shapes of torchvision's ``arch`` without its classifier (built on the meta device: no memory)."""
    if arch not in ARCHS:
        raise UserError(f"unsupported architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}


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
    candidates = [n for n, a in ARCHS.items() if (a.block, a.stage_blocks) == (block, tuple(counts))]
    if block == "basic" or not candidates:
        return candidates[0] if candidates else None
    conv2 = sd["layer1.0.conv2.weight"]
    width, groups = conv2.shape[0], conv2.shape[0] // conv2.shape[1]
    return next(
        (n for n in candidates if (ARCHS[n].num_groups, ARCHS[n].res2_width) == (groups, width)), None
    )


def check_arch(state: BackboneState, expected: str, name: str = "checkpoint") -> None:
    """UserError unless the backbone is the ``expected`` torchvision ResNet."""
    if state.arch != expected:
        raise UserError(f"{name} holds a {state.arch or 'non-standard ResNet'} backbone, expected {expected}")
