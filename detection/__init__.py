"""Detectron2 detection transfer for MoCo pretrained backbones.

Importing this package registers everything the project's detection configs name
(the ``Res5ROIHeadsExtraNorm`` ROI heads and the small-image ResNet backbone
``build_small_resnet_backbone``).
"""

import warnings

from moco_d2.core.threads import apply_policy

apply_policy()  # before anything imports torch: OpenMP reads its settings when torch loads

# Detectron2 scripts a few helpers with torch.jit.script at import time, which new torch versions
# deprecate with a FutureWarning on every run; it is not actionable for users of this project.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from detection.backbone import build_small_resnet_backbone  # noqa: E402
from detection.roi_heads import Res5ROIHeadsExtraNorm, build_res5  # noqa: E402

__all__ = ["Res5ROIHeadsExtraNorm", "build_res5", "build_small_resnet_backbone"]
