"""Torchvision ResNet names -> Detectron2 ResNet names (names only; the shape check lives in core.backbone).

Detectron2 names the same tensors differently:

    conv1.weight                    -> stem.conv1.weight
    bn1.{weight,bias,running_*}     -> stem.conv1.norm.*
    layer{i}.{j}.conv{k}.weight     -> res{i+1}.{j}.conv{k}.weight
    layer{i}.{j}.bn{k}.*            -> res{i+1}.{j}.conv{k}.norm.*
    layer{i}.{j}.downsample.0.*     -> res{i+1}.{j}.shortcut.*
    layer{i}.{j}.downsample.1.*     -> res{i+1}.{j}.shortcut.norm.*
    *.num_batches_tracked           -> dropped (Detectron2 does not use it)

The rules only touch names, so they hold for BasicBlock (ResNet-18/34) and Bottleneck (50/101/152) alike.
"""

from __future__ import annotations

import re

import torch

_STEM = re.compile(r"^(conv1|bn1)\.(\w+)$")
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.(\w+)$")


def torchvision_to_detectron2_key(name: str) -> str | None:
    """Detectron2 name of one torchvision ResNet tensor; None for ``num_batches_tracked`` (dropped)."""
    if name.endswith("num_batches_tracked"):
        return None
    m = _STEM.match(name)
    if m:
        layer, leaf = m.groups()
        return f"stem.conv1.{leaf}" if layer == "conv1" else f"stem.conv1.norm.{leaf}"
    m = _BLOCK.match(name)
    if m:
        stage, block, layer, leaf = m.groups()
        prefix = f"res{int(stage) + 1}.{block}"
        if layer == "downsample.0":
            return f"{prefix}.shortcut.{leaf}"
        if layer == "downsample.1":
            return f"{prefix}.shortcut.norm.{leaf}"
        if layer.startswith("bn"):
            return f"{prefix}.conv{layer[2:]}.norm.{leaf}"
        return f"{prefix}.{layer}.{leaf}"
    raise ValueError(f"{name!r} is not a torchvision ResNet backbone tensor name")


def detectron2_model_key(d2_key: str) -> str:
    """Where a converted key must end up in Detectron2's C4 model: res5 is the ROI head's, the rest the backbone's."""
    return f"roi_heads.{d2_key}" if d2_key.startswith("res5.") else f"backbone.{d2_key}"


def to_detectron2_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet backbone state dict to Detectron2 names; tensors are the same objects."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        d2_name = torchvision_to_detectron2_key(name)
        if d2_name is not None:
            out[d2_name] = tensor
    return out
