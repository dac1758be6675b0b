"""Detectron2 detection transfer for MoCo pretrained backbones.

Importing this package registers everything the project's detection configs name
(the ``Res5ROIHeadsExtraNorm`` ROI heads).
"""

from detection.roi_heads import Res5ROIHeadsExtraNorm, build_res5

__all__ = ["Res5ROIHeadsExtraNorm", "build_res5"]
