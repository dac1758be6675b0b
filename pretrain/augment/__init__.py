"""Two-view augmentation for pretraining: ``reference`` (the official recipes), ``fast`` (the same
distribution, faster on the CPU) and ``device`` (the colour half on the accelerator); this module picks one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from pretrain.augment import fast as fast_augment
from pretrain.augment.reference import (
    TwoCropsTransform,
    TwoViews,
    aug_settings,
    mocov1_reference,
    mocov2_reference,
)


def build_pretrain_transform(
    aug_cfg: Any, normalize_on_device: bool = False
) -> Callable[[Image.Image], TwoViews]:
    """Return the two-view transform chosen by ``AUG.NAME`` and ``AUG.IMPL``.

    "reference": the official PIL/torchvision pipeline. "fast": the same random recipe computed by
    ``pretrain.augment.fast`` (decode-once, fused uint8 ops); with ``normalize_on_device`` it returns
    uint8 views and ``pretrain.augment.device.Normalize`` finishes them on the device. "gpu": the CPU side
    only crops, resizes and flips, returning two uint8 CHW tensors; ``pretrain.augment.device.GPUAugment``
    does the rest on the device.
    """
    s = aug_settings(aug_cfg)
    if s["impl"] == "reference":
        if s["name"] == "mocov2":
            return TwoCropsTransform(
                mocov2_reference(s["size"], s["scale"], s["mean"], s["std"], s["blur_sigma"])
            )
        return TwoCropsTransform(mocov1_reference(s["size"], s["scale"], s["mean"], s["std"]))
    if s["impl"] == "fast":
        return fast_augment.FastTwoViewTransform(
            s["name"],
            s["size"],
            s["scale"],
            s["mean"],
            s["std"],
            uint8_output=normalize_on_device,
            blur_sigma=s["blur_sigma"],
        )
    return fast_augment.CropFlipTwoView(s["size"], s["scale"])
