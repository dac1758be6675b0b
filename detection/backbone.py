"""Detectron2 backbones for the architecture table's ResNets that Detectron2 cannot build itself.

``moco_d2.core.backbone.ARCHS`` defines every ResNet once. The stock ones (7x7 stride-2 stem + max-pool,
64 stem channels) are Detectron2's own ``build_resnet_backbone``. A small-image variant (``small_stem``:
one 3x3 conv of stride ``stem_stride``, no max-pool, any ``width``) is ``build_small_resnet_backbone``
registered here: the same ``stem.conv1`` / ``res2..res4`` names and block classes, so ``convert/``'s name
mapping holds unchanged, and a stem whose ``stride`` is the real one, so every stage's stride in
``output_shape()`` -- hence the RPN anchors' and the ROI pooler's scale -- is right (stride-2 stem:
res2 2, res3 4, res4 8). res5 is built by the C4 ROI head (``detection.roi_heads.build_res5``) from
``MODEL.RESNETS.DEPTH`` / ``RES2_OUT_CHANNELS``, so it gets the backbone's block type and widths.

:func:`apply_arch` writes an architecture's keys into a Detectron2 config; the converter's validation
uses it and ``tests/detection`` check the demo's configs spell the same values.
"""

from __future__ import annotations

import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from fvcore.nn import weight_init

from moco_d2.core.backbone import ARCHS, STAGE_BLOCKS
from moco_d2.core.errors import UserError

SMALL_BACKBONE = "build_small_resnet_backbone"
STOCK_BACKBONE = "build_resnet_backbone"


class SmallImageStem(CNNBlockBase):
    """One 3x3 conv (+ norm, ReLU) of stride ``stride``, no max-pool: torchvision's ``conv1``/``bn1`` of
    ``moco_d2.core.backbone.SmallImageResNet``, named ``stem.conv1`` like Detectron2's ``BasicStem``."""

    def __init__(self, in_channels: int = 3, out_channels: int = 16, stride: int = 2, norm: str = "BN"):
        super().__init__(in_channels, out_channels, stride)
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=1,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        weight_init.c2_msra_fill(self.conv1)

    def forward(self, x):
        return F.relu_(self.conv1(x))


@BACKBONE_REGISTRY.register()
def build_small_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """Detectron2 ``ResNet`` with :class:`SmallImageStem` (stride ``MODEL.RESNETS.STEM_STRIDE``) and
    ``STEM_OUT_CHANNELS`` -> ``RES2_OUT_CHANNELS`` x 1/2/4/8 stages of torchvision's block layout."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in STAGE_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH={r.DEPTH} is not one of {sorted(STAGE_BLOCKS)}")
    if r.RES5_DILATION != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(f"{SMALL_BACKBONE} supports neither RES5_DILATION nor deformable convs")
    stem = SmallImageStem(input_shape.channels, r.STEM_OUT_CHANNELS, r.get("STEM_STRIDE", 2), r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck_channels = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, num_blocks in enumerate(STAGE_BLOCKS[r.DEPTH]):
        kwargs = {
            "num_blocks": num_blocks,
            "stride_per_block": [1 if idx == 0 else 2] + [1] * (num_blocks - 1),
            "in_channels": in_channels,
            "out_channels": out_channels,
            "norm": r.NORM,
        }
        if r.DEPTH in (18, 34):
            kwargs["block_class"] = BasicBlock
        else:
            kwargs |= {
                "block_class": BottleneckBlock,
                "bottleneck_channels": bottleneck_channels,
                "num_groups": r.NUM_GROUPS,
                "stride_in_1x1": r.STRIDE_IN_1X1,
            }
        stages.append(ResNet.make_stage(**kwargs))
        in_channels, out_channels, bottleneck_channels = (
            out_channels,
            2 * out_channels,
            2 * bottleneck_channels,
        )
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def arch_cfg_values(arch: str) -> dict[str, object]:
    """The Detectron2 config keys (full names) that make its C4 model the table's ``arch``."""
    if arch not in ARCHS:
        raise UserError(f"unsupported architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    values: dict[str, object] = {
        "MODEL.BACKBONE.NAME": SMALL_BACKBONE if spec.small_stem else STOCK_BACKBONE,
        "MODEL.RESNETS.DEPTH": spec.depth,
        "MODEL.RESNETS.NUM_GROUPS": spec.num_groups,
        "MODEL.RESNETS.WIDTH_PER_GROUP": spec.res2_width // spec.num_groups,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": spec.stem_out_channels,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": spec.res2_out_channels,
    }
    if spec.small_stem:
        values["MODEL.RESNETS.STEM_STRIDE"] = spec.stem_stride
    return values


def apply_arch(cfg: CfgNode, arch: str) -> CfgNode:
    """Set ``cfg``'s backbone keys to build the table's ``arch`` (in place; ``cfg`` must not be frozen)."""
    for key, value in arch_cfg_values(arch).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
