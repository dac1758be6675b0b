"""Pretrained ResNet backbones -> Detectron2 weights (or plain torchvision state dicts), validated."""

from moco_d2.core.threads import apply_policy

apply_policy()  # before anything imports torch: OpenMP reads its settings when torch loads

from convert.converter import (  # noqa: E402
    ConvertReport,
    ValidationError,
    default_output,
    load_backbone,
    to_detectron2,
    to_torchvision,
)
from convert.mapping import detectron2_model_key, torchvision_to_detectron2_key  # noqa: E402

__all__ = [
    "ConvertReport",
    "ValidationError",
    "default_output",
    "detectron2_model_key",
    "load_backbone",
    "to_detectron2",
    "to_torchvision",
    "torchvision_to_detectron2_key",
]
