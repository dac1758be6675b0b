"""Pretrained ResNet backbones -> Detectron2 weights (or plain torchvision state dicts), validated."""

from convert.converter import (
    ConvertReport,
    ValidationError,
    default_output,
    load_backbone,
    to_detectron2,
    to_torchvision,
)
from convert.mapping import detectron2_model_key, torchvision_to_detectron2_key

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
