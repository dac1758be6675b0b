"""Fast CPU implementation of the MoCo augmentation recipes.

It makes exactly the random draws the reference pipeline (``pretrain/augment.py``) makes, in the same
order and from the same generators (torch's global RNG and Python's ``random``), so with the same
seed it picks the same crops, jitter factors, op order, grayscale/blur/flip decisions and blur sigma.
Only the pixel arithmetic differs, and each op is tested against its PIL/torchvision counterpart:

* crop + resize: one antialiased bilinear ``torch.nn.functional.interpolate`` on the uint8 crop
  (a vectorised port of Pillow's resampling; it matches ``PIL crop().resize()`` to within 1 level);
* brightness / contrast: PIL's blend formula evaluated once for all 256 input values (a lookup
  table), so the output is bit-identical to PIL's;
* saturation / grayscale: the same luma blend with one rounding instead of PIL's truncation (±1);
* hue: an 8-bit HSV round trip in OpenCV instead of Pillow's, which is closer to an exact hue
  rotation than Pillow's own (see the tests);
* blur: Pillow's GaussianBlur is three extended box filters per axis; we apply the very same
  combined kernel once with OpenCV (one rounding instead of six);
* flip, then uint8 -> float conversion fused with the normalisation.

The image is decoded once by the dataset and shared by both views, as in the reference.
OpenCV is limited to one thread per process: the loader parallelises over images.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms

from moco_d2.core.images import IMAGENET_MEAN, IMAGENET_STD
from pretrain.augment.reference import BLUR_SIGMA, CROP_RATIO, TwoViews

# The reference recipes' jitter strengths: ColorJitter(brightness, contrast, saturation, hue).
JITTER_V2 = transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)
JITTER_V1 = transforms.ColorJitter(0.4, 0.4, 0.4, 0.4)

_single_thread_pid: int | None = None


def _single_threaded_cv2() -> None:
    """Pin OpenCV to one thread once per (possibly forked) process: 224² ops don't gain from threads."""
    global _single_thread_pid
    if _single_thread_pid != os.getpid():
        cv2.setNumThreads(1)
        _single_thread_pid = os.getpid()


def to_hwc_uint8(img: Image.Image | np.ndarray) -> np.ndarray:
    """A writable, contiguous HxWx3 uint8 RGB array (grayscale and palette images are converted)."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 uint8 RGB array, got {img.dtype} {img.shape}")
        return np.ascontiguousarray(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img)


def resized_crop(src: Tensor, top: int, left: int, height: int, width: int, size: int) -> np.ndarray:
    """Crop ``src`` (1x3xHxW uint8, channels-last memory) and resize to size² like PIL's BILINEAR."""
    # a channels-last crop makes interpolate write channels-last (HWC) output: no transpose copy after
    crop = src[:, :, top : top + height, left : left + width].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def _blend_lut(base: float, factor: float) -> np.ndarray:
    """PIL's ``Image.blend(constant base, img, factor)`` for every uint8 value (float32, truncation)."""
    values = np.float32(base) + np.float32(factor) * (np.arange(256, dtype=np.float32) - np.float32(base))
    return np.clip(np.floor(values), 0, 255).astype(np.uint8)


def luma(x: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, the same weights as PIL's ``convert("L")``."""
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(x, _blend_lut(0.0, factor))


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    mean = int(cv2.mean(luma(x))[0] + 0.5)  # PIL rounds the mean luma to an integer
    return cv2.LUT(x, _blend_lut(mean, factor))


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    gray = cv2.cvtColor(luma(x), cv2.COLOR_GRAY2RGB)
    # PIL truncates ``gray + factor * (x - gray)``; rounding (value - 0.5) is the same up to ties.
    return cv2.addWeighted(x, factor, gray, 1.0 - factor, -0.5)


def adjust_hue(x: np.ndarray, hue_factor: float) -> np.ndarray:
    """Rotate hue by ``hue_factor`` turns, quantised to 1/255 turn like torchvision's PIL backend."""
    shift = int(np.int32(hue_factor * 255).astype(np.uint8))
    ramp = np.arange(256, dtype=np.int64)
    table = np.stack([(ramp + shift) % 256, ramp, ramp], axis=-1).astype(np.uint8)[:, None, :]
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    return cv2.cvtColor(cv2.LUT(hsv, table), cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(luma(x), cv2.COLOR_GRAY2RGB)


def pil_blur_kernel(sigma: float, passes: int = 3) -> np.ndarray:
    """The 1-D kernel Pillow's ``GaussianBlur(radius=sigma)`` applies: ``passes`` extended box filters.

    Box length and fractional radius follow Gwosdek et al. 2011 (the paper Pillow implements), so the
    combined kernel has exactly variance sigma².
    """
    var = sigma * sigma / passes
    length = np.sqrt(12.0 * var + 1.0)
    whole = np.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    radius = whole + frac
    inner = 1.0 / (2.0 * radius + 1.0)
    edge = (1.0 - (2 * int(whole) + 1) * inner) / 2.0
    box = np.array([edge] + [inner] * (2 * int(whole) + 1) + [edge])
    kernel = box
    for _ in range(passes - 1):
        kernel = np.convolve(kernel, box)
    return kernel.astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    kernel = pil_blur_kernel(sigma)
    return cv2.sepFilter2D(x, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)


def hflip(x: np.ndarray) -> np.ndarray:
    return cv2.flip(x, 1)


def color_jitter(x: np.ndarray, jitter: transforms.ColorJitter) -> np.ndarray:
    """Apply ``jitter`` with its own draws (random op order, then the four factors) to a uint8 array."""
    order, bf, cf, sf, hf = jitter.get_params(
        jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
    )
    for op in order.tolist():
        if op == 0:
            x = adjust_brightness(x, bf)
        elif op == 1:
            x = adjust_contrast(x, cf)
        elif op == 2:
            x = adjust_saturation(x, sf)
        else:
            x = adjust_hue(x, hf)
    return x


class Normalize:
    """uint8 HWC -> normalised float CHW in one pass: (x - 255 mean) / (255 std)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.offset = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0)

    def __call__(self, x: np.ndarray) -> Tensor:
        out = torch.empty((3, x.shape[0], x.shape[1]), dtype=torch.float32)
        out.copy_(torch.from_numpy(x).permute(2, 0, 1))
        return out.sub_(self.offset).mul_(self.scale)


def _rand_below(p: float) -> bool:
    """``torch.rand(1) < p``, the draw behind RandomGrayscale / RandomHorizontalFlip."""
    return bool(torch.rand(1) < p)


def _random_apply(p: float) -> bool:
    """``transforms.RandomApply(p)``'s draw: it applies unless ``p < torch.rand(1)``."""
    return not bool(p < torch.rand(1))


def sample_crop(height: int, width: int, scale: Sequence[float]) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` for an image of this size: (top, left, crop_h, crop_w)."""
    dummy = torch.empty((0, height, width), dtype=torch.uint8)  # only its size is read
    return transforms.RandomResizedCrop.get_params(dummy, list(scale), list(CROP_RATIO))


class FastTwoViewTransform:
    """Two augmented views with the reference recipe's distribution, 3-4x cheaper per image on CPU."""

    def __init__(
        self,
        name: str = "mocov2",
        size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        uint8_output: bool = False,
    ) -> None:
        """``uint8_output``: return the augmented uint8 CHW views and leave the normalisation to the
        device (``pretrain.augment.device.Normalize``): 3 bytes per pixel through the loader, pinned memory
        and the host-to-device copy instead of 12, and no float pass in the workers."""
        if name not in ("mocov2", "mocov1"):
            raise ValueError(f"unknown augmentation recipe {name!r}")
        self.name = name
        self.size = int(size)
        self.scale = tuple(scale)
        self.normalize = Normalize(mean, std)
        self.uint8_output = uint8_output

    def __call__(self, img: Image.Image | np.ndarray) -> TwoViews:
        _single_threaded_cv2()
        rgb = to_hwc_uint8(img)
        src = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)  # channels-last view, no copy
        return self.view(src), self.view(src)

    def view(self, src: Tensor) -> Tensor:
        top, left, h, w = sample_crop(src.shape[2], src.shape[3], self.scale)
        x = resized_crop(src, top, left, h, w, self.size)
        if self.name == "mocov2":
            if _random_apply(0.8):
                x = color_jitter(x, JITTER_V2)
            if _rand_below(0.2):
                x = to_grayscale(x)
            if _random_apply(0.5):
                x = gaussian_blur(x, random.uniform(*BLUR_SIGMA))
        else:
            if _rand_below(0.2):
                x = to_grayscale(x)
            x = color_jitter(x, JITTER_V1)
        if _rand_below(0.5):
            x = hflip(x)
        if self.uint8_output:
            return torch.from_numpy(x).permute(2, 0, 1)  # CHW view; the collate copies it into the batch
        return self.normalize(x)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, size={self.size}, scale={self.scale}, "
            f"uint8_output={self.uint8_output})"
        )


class CropFlipTwoView:
    """CPU half of the device path: two random resized crops + flips as uint8 CHW tensors.

    The colour ops, blur and normalisation follow on the accelerator (``pretrain.augment.device``), so the
    loader ships 3 bytes per pixel instead of 12.
    """

    def __init__(self, size: int = 224, scale: Sequence[float] = (0.2, 1.0)) -> None:
        self.size = int(size)
        self.scale = tuple(scale)

    def __call__(self, img: Image.Image | np.ndarray) -> tuple[Tensor, Tensor]:
        rgb = to_hwc_uint8(img)
        src = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
        return self.view(src), self.view(src)

    def view(self, src: Tensor) -> Tensor:
        top, left, h, w = sample_crop(src.shape[2], src.shape[3], self.scale)
        crop = src[:, :, top : top + h, left : left + w].contiguous(memory_format=torch.channels_last)
        out = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        if _rand_below(0.5):
            out = out.flip(-1)
        return out  # CHW view of HWC memory; the loader's collate copies it into the batch anyway

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale})"
