"""C4 box head whose res5 matches the pretrained backbone and ends with an extra BN.

The MoCo detection protocol fine-tunes every pretrained layer, res5 included. Detectron2's
stock ``Res5ROIHeads`` always builds bottleneck blocks, so a ResNet-18/34 backbone could not
hand its res5 weights to the head. This head builds res5 from the same block type as the
backbone (BasicBlock for depth 18/34, BottleneckBlock for 50/101/152) and appends one more
normalisation layer (``roi_heads.res5.norm``): with BN trained end to end it re-normalises the
pooled region features before the box predictor, as in the MoCo paper's C4 setup.
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

# Number of residual blocks in res5 for each ResNet depth (torchvision's layer4).
RES5_BLOCKS = {18: 2, 34: 3, 50: 3, 101: 3, 152: 3}


def build_res5(cfg: CfgNode) -> tuple[nn.Sequential, int]:
    """Build the res5 stage used as the per-region head, matching the backbone's block type.

    Returns the stage (ending in the extra ``norm`` layer) and its number of output channels.
    """
    r = cfg.MODEL.RESNETS
    depth = r.DEPTH
    if depth not in RES5_BLOCKS:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not one of {sorted(RES5_BLOCKS)}")
    assert not r.DEFORM_ON_PER_STAGE[-1], "Deformable conv is not supported in the res5 head."
    stage_channel_factor = 2**3  # res5 has 8x the channels of res2
    # res5 has 512 channels with Basic blocks (RES2_OUT_CHANNELS=64), 2048 with Bottleneck ones (256).
    out_channels = r.RES2_OUT_CHANNELS * stage_channel_factor
    block, block_args = BasicBlock, {}
    if depth not in (18, 34):
        block = BottleneckBlock
        block_args = {
            "bottleneck_channels": r.NUM_GROUPS * r.WIDTH_PER_GROUP * stage_channel_factor,
            "num_groups": r.NUM_GROUPS,
            "stride_in_1x1": r.STRIDE_IN_1X1,
        }
    blocks = ResNet.make_stage(
        block,
        RES5_BLOCKS[depth],
        stride_per_block=[2] + [1] * (RES5_BLOCKS[depth] - 1),
        in_channels=out_channels // 2,
        out_channels=out_channels,
        norm=r.NORM,
        **block_args,
    )
    res5 = nn.Sequential(*blocks)
    # Named "norm" so the parameters are `roi_heads.res5.norm.*` (trained from scratch).
    res5.add_module("norm", get_norm(r.NORM, out_channels))
    return res5, out_channels


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """``Res5ROIHeads`` with a backbone-matched res5 followed by one extra norm layer."""

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode) -> tuple[nn.Sequential, int]:
        return build_res5(cfg)
