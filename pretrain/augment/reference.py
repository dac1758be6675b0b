"""MoCo data augmentations: the reference recipes and the entry points that pick an implementation.

The reference recipes are written to match the official MoCo code (``main_moco.py``) op for op, so
the "reference" implementation is the yardstick the fast CPU path (``pretrain/augment/fast.py``) and
the device path (``pretrain/augment/device.py``) are tested against.

Randomness: every CPU transform here draws only from torch's global RNG and Python's ``random``
(like torchvision), which ``pretrain/data.py`` seeds per sample.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from PIL import Image, ImageFilter
from torch import Tensor
from torchvision import transforms

from moco_d2.core.config import pretrain_defaults
from moco_d2.core.errors import UserError
from moco_d2.core.images import IMAGENET_MEAN, IMAGENET_STD

# RandomResizedCrop's default aspect-ratio range, used by every recipe here.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA = (0.1, 2.0)

AUG_NAMES = ("mocov2", "mocov1")
AUG_IMPLS = ("reference", "fast", "gpu")

TwoViews = tuple[Tensor, Tensor]


class GaussianBlur:
    """Gaussian blur with sigma drawn uniformly per call, as in SimCLR / MoCo v2 (PIL radius = sigma)."""

    def __init__(self, sigma: Sequence[float] = BLUR_SIGMA) -> None:
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


class TwoCropsTransform:
    """Apply one random transform twice to the same image: the query and key views."""

    def __init__(self, base_transform: Callable[[Image.Image], Tensor]) -> None:
        self.base_transform = base_transform

    def __call__(self, img: Image.Image) -> TwoViews:
        return self.base_transform(img), self.base_transform(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_transform!r})"


def mocov2_reference(
    size: int = 224,
    scale: Sequence[float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur_sigma: Sequence[float] = BLUR_SIGMA,
) -> transforms.Compose:
    """MoCo v2 "aug+" (SimCLR-style), identical to the official code (with the default ``blur_sigma``)."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=tuple(scale)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur(blur_sigma)], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


# Repeats mocov2_reference's frame on purpose: each recipe mirrors its official main_moco.py lines.
def mocov1_reference(
    size: int = 224,
    scale: Sequence[float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """MoCo v1 / InstDisc augmentation, identical to the official code."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=tuple(scale)),
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ]
    )


@cache
def _default_aug() -> Any:
    return pretrain_defaults().AUG


def _cfg(aug_cfg: Any, key: str) -> Any:
    """Read an AUG key; ``pretrain_defaults()`` (the one copy of the defaults) fills a key that an older or
    partial config (or ``None``) lacks."""
    source = aug_cfg if aug_cfg is not None and hasattr(aug_cfg, key) else _default_aug()
    return getattr(source, key)


def aug_settings(aug_cfg: Any) -> dict[str, Any]:
    """Validate the AUG config section and return plain Python values."""
    name = str(_cfg(aug_cfg, "NAME")).lower()
    impl = str(_cfg(aug_cfg, "IMPL")).lower()
    if name not in AUG_NAMES:
        raise UserError(f"config key AUG.NAME: expected one of {list(AUG_NAMES)}, got {name!r}")
    if impl not in AUG_IMPLS:
        raise UserError(f"config key AUG.IMPL: expected one of {list(AUG_IMPLS)}, got {impl!r}")
    size = int(_cfg(aug_cfg, "SIZE"))
    if size <= 0:
        raise UserError(f"config key AUG.SIZE: expected a positive integer, got {size}")
    scale = tuple(float(s) for s in _cfg(aug_cfg, "CROP_SCALE"))
    if len(scale) != 2 or not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise UserError(
            f"config key AUG.CROP_SCALE: expected [min, max] with 0 < min <= max <= 1, got {scale}"
        )
    mean = tuple(float(m) for m in _cfg(aug_cfg, "MEAN"))
    std = tuple(float(s) for s in _cfg(aug_cfg, "STD"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"config keys AUG.MEAN/AUG.STD: expected 3 values each (STD > 0), got {mean} / {std}")
    blur = tuple(float(s) for s in _cfg(aug_cfg, "BLUR_SIGMA"))
    if len(blur) != 2 or not (0.0 < blur[0] <= blur[1]):
        raise UserError(
            f"config key AUG.BLUR_SIGMA: expected [min, max] with 0 < min <= max, got {list(blur)}"
        )
    return {
        "name": name,
        "impl": impl,
        "size": size,
        "scale": scale,
        "mean": mean,
        "std": std,
        "blur_sigma": blur,
    }
