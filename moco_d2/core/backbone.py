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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

from moco_d2.core.errors import UserError
from moco_d2.core.io import load_checkpoint
from moco_d2.core.training import load_state_checked

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
IMAGENET_STEM_STRIDE = 4  # torchvision's stem: 7x7 stride-2 conv, then a 3x3 stride-2 max-pool


@dataclass(frozen=True)
class ArchSpec:
    """One ResNet in torchvision's layout: its structure, and what Detectron2 needs to rebuild it.

    ``small_stem`` replaces torchvision's ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool,
    stride 4) by one 3x3 conv of stride ``stem_stride`` and no max-pool: on a 28-32 px image the stock
    stem leaves 8x8 before res2 and 1x1 at res5. ``width`` is the stem's output channels (torchvision's
    ``inplanes``); the stages have ``width`` x 1/2/4/8 channels (x4 for Bottleneck outputs).
    State-dict names are torchvision's either way (``conv1``, ``bn1``, ``layer1..4``, ``fc``).
    """

    depth: int
    num_groups: int = 1
    width_per_group: int = 64
    width: int = 64
    small_stem: bool = False
    stem_stride: int = IMAGENET_STEM_STRIDE

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
    def stem_kernel(self) -> int:
        return 3 if self.small_stem else 7

    @property
    def stem_out_channels(self) -> int:
        return self.width

    @property
    def res2_width(self) -> int:
        """Output channels of the first block's 3x3 conv (torchvision: planes x width/64 x groups)."""
        return int(self.width * self.width_per_group / 64) * self.num_groups

    @property
    def res2_out_channels(self) -> int:
        # BasicBlock stages keep ``width`` channels in res2; Bottleneck stages expand them 4x.
        return self.width if self.basic_block else 4 * self.width

    @property
    def stage_channels(self) -> tuple[int, int, int, int]:
        """Output channels of res2..res5 (torchvision's layer1..layer4)."""
        return tuple(self.res2_out_channels * 2**i for i in range(4))

    @property
    def stage_strides(self) -> tuple[int, int, int, int]:
        """Output strides of res2..res5 relative to the input image."""
        return tuple(self.stem_stride * 2**i for i in range(4))

    @property
    def feature_dim(self) -> int:
        """Channels of the pooled features (the input of ``fc``)."""
        return self.stage_channels[-1]

    @property
    def stock(self) -> bool:
        """Built by torchvision's own constructor of this name (no small stem, no width change)."""
        return not self.small_stem and self.width == 64

    @property
    def plain(self) -> bool:
        """No groups, no widening: the encoders MoCo pretraining builds."""
        return self.num_groups == 1 and self.width_per_group == 64


# THE architecture table: name -> structure. Everything else derives from it. Stock entries are
# torchvision constructor names; a small-image variant of another width or stem stride is one more line
# (e.g. "resnet18_small_w32": ArchSpec(18, width=32, small_stem=True, stem_stride=2)).
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
    # ResNet-18 for 28-32 px images (the demo's Fashion-MNIST): 3x3 stride-2 stem, no max-pool,
    # 16-32-64-128 channels; res2..res5 at strides 2/4/8/16 (a 28 px image: 14/7/4/2 px maps).
    "resnet18_small": ArchSpec(18, width=16, small_stem=True, stem_stride=2),
}
PRETRAIN_ARCHS = tuple(name for name, spec in ARCHS.items() if spec.plain)


def check_pretrain_arch(arch: str, key: str = "MODEL.ARCH") -> None:
    """One-line UserError unless MoCo pretraining can build ``arch``."""
    if arch not in PRETRAIN_ARCHS:
        raise UserError(
            f"{key} {arch!r} is not a torchvision ResNet that pretraining builds ({', '.join(PRETRAIN_ARCHS)})"
        )


class SmallImageResNet(torchvision.models.ResNet):
    """torchvision's ResNet with a 3x3 stem conv of stride ``stem_stride``, no max-pool and ``width`` stem
    channels (stages ``width`` x 1/2/4/8). Same module names and forward as torchvision's (``maxpool`` is an
    Identity), so its state dict and every tool that reads torchvision ResNets work unchanged."""

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, ...],
        width: int = 16,
        stem_stride: int = 2,
        num_classes: int = 1000,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # torchvision's __init__ hard-codes the 64-channel ImageNet stem
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = self._norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_resnet(arch: str, **kwargs) -> torchvision.models.ResNet:
    """The torchvision-layout ResNet ``arch`` of the table (``num_classes``, ``norm_layer`` ... as torchvision's).

    The one constructor every tool uses (pretraining, kNN, linear evaluation, conversion checks, demo).
    """
    if arch not in ARCHS:
        raise UserError(f"unsupported architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    if spec.stock:
        return getattr(torchvision.models, arch)(**kwargs)
    if not spec.small_stem or not spec.plain:
        raise ValueError(f"ARCHS[{arch!r}]: a non-64 width needs small_stem and a plain ResNet")
    kwargs.pop("weights", None)
    block = torchvision.models.resnet.BasicBlock if spec.basic_block else torchvision.models.resnet.Bottleneck
    return SmallImageResNet(block, spec.stage_blocks, spec.width, spec.stem_stride, **kwargs)


def reference_shapes(arch: str) -> dict[str, torch.Size]:
    """Tensor shapes of ``arch`` without its classifier (built on the meta device: no memory)."""
    if arch not in ARCHS:
        raise UserError(f"unsupported architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    with torch.device("meta"):
        model = build_resnet(arch)
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}


def check_resnet_state(state_dict: dict[str, torch.Tensor], arch: str, where: str) -> None:
    """Raise UserError unless ``state_dict`` holds every backbone tensor of torchvision's ``arch``, shaped right.

    ``num_batches_tracked`` may be absent (some exporters drop it); anything else missing, extra or
    misshapen means the checkpoint is not the ResNet the user asked for.
    """
    expected = reference_shapes(arch)
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(required - state_dict.keys())
    extra = sorted(state_dict.keys() - expected.keys())
    wrong = sorted(k for k in required & state_dict.keys() if state_dict[k].shape != expected[k])
    if missing or extra or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if extra:
            details.append(f"{len(extra)} unexpected (e.g. {extra[0]!r})")
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} with the wrong shape (e.g. {k!r}: {tuple(state_dict[k].shape)}, "
                f"expected {tuple(expected[k])})"
            )
        raise UserError(f"{where}: backbone weights are not a torchvision {arch}: {'; '.join(details)}")


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
    arch = infer_resnet_arch(sd, meta.get("arch") if isinstance(meta.get("arch"), str) else None)
    if isinstance(meta.get("arch"), str) and arch is not None and meta["arch"] != arch:
        raise UserError(f"{name} says arch {meta['arch']!r} but its weights are a {arch}")
    return BackboneState(state_dict=sd, source=source, arch=arch or meta.get("arch"), meta=meta)


def load_resnet_state(path: str | os.PathLike) -> BackboneState:
    """Load ``path`` safely (weights only) and extract its ResNet backbone."""
    return extract_resnet_state(load_checkpoint(path), name=f"checkpoint {str(path)!r}")


def candidate_archs(sd: dict[str, torch.Tensor]) -> list[str]:
    """Every table architecture whose tensors ``sd``'s structure matches: blocks per stage, block type,
    stem kernel and width, res2 groups and width. Weights cannot tell stem strides apart."""
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(idx))
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    stem = sd.get("conv1.weight")
    conv2 = sd.get("layer1.0.conv2.weight")
    if stem is None or conv2 is None or stem.dim() != 4 or conv2.dim() != 4:
        return []
    width, groups = conv2.shape[0], conv2.shape[0] // max(conv2.shape[1], 1)
    return [
        n
        for n, a in ARCHS.items()
        if (a.block, a.stage_blocks) == (block, tuple(counts))
        and (a.stem_out_channels, a.stem_kernel) == (stem.shape[0], stem.shape[-1])
        and (a.num_groups, a.res2_width) == (groups, width)
    ]


def infer_resnet_arch(sd: dict[str, torch.Tensor], hint: str | None = None) -> str | None:
    """Name the table's ResNet whose structure ``sd`` has (``hint``, e.g. the checkpoint's own ``arch``,
    settles a tie between variants that differ only in stem stride), or None for an unknown variant."""
    candidates = candidate_archs(sd)
    if hint in candidates:
        return hint
    return candidates[0] if len(candidates) == 1 else None


def read_backbone(path: str | os.PathLike, arch: str = "", key: str = "MODEL.WEIGHTS") -> BackboneState:
    """:func:`load_resnet_state`, refused in one line unless it is a table ResNet (``arch``, when given)."""
    state = load_resnet_state(path)
    if state.arch is None:
        raise UserError(f"{key} {str(path)!r} holds a non-standard ResNet; no architecture of the table fits")
    if arch and state.arch != arch:
        raise UserError(f"{key} {str(path)!r} holds a {state.arch} backbone but MODEL.ARCH is {arch!r}")
    return state


def load_backbone(
    weights: str | os.PathLike | BackboneState, arch: str = "", name: str = "MODEL.WEIGHTS", **build_kwargs
) -> tuple[torchvision.models.ResNet, BackboneState]:
    """THE way to get a checkpoint into a ResNet: :func:`build_resnet` (``build_kwargs``, e.g. ``num_classes``)
    holding the backbone of ``weights`` (a path, or what :func:`read_backbone` returned); ``fc`` stays new.

    Every mismatch is a one-line UserError starting with ``name``; returns (model, the backbone read).
    """
    if not isinstance(weights, BackboneState):
        state, name = read_backbone(weights, arch, name), f"{name} {str(weights)!r}"
    elif arch and weights.arch != arch:
        raise UserError(
            f"{name} holds a {weights.arch or 'non-standard ResNet'} backbone but MODEL.ARCH is {arch!r}"
        )
    else:
        state = weights
    model = build_resnet(state.arch, **build_kwargs)
    load_state_checked(model, state.state_dict, name, hint="MODEL.ARCH", may_miss=("fc.",))
    return model, state


def check_arch(state: BackboneState, expected: str, name: str = "checkpoint") -> None:
    """UserError unless the backbone is the ``expected`` torchvision ResNet."""
    if state.arch != expected:
        raise UserError(f"{name} holds a {state.arch or 'non-standard ResNet'} backbone, expected {expected}")
