"""Fast CPU implementation of the MoCo augmentation recipes.

It makes exactly the random draws the reference pipeline (``pretrain/augment/reference.py``) makes,
in the same order and from the same generators (torch's global RNG and Python's ``random``), so with
the same seed it picks the same crops, jitter factors, op order, grayscale/blur/flip decisions and blur
sigma. The crop sampler and the coin flips make torchvision's torch calls without its per-call tensor
bookkeeping (tested equal, RNG state included); the blur's box weights are Pillow's float32 formula on
numpy float32 scalars (tested equal on 20k sigmas).
Only the pixel arithmetic differs, and each op is tested against its PIL/torchvision counterpart:

* crop + resize: torch's uint8 antialiased bilinear (Pillow's two-pass algorithm with 15-bit instead
  of 22-bit weights): within 1 level of ``PIL crop().resize()``, not exact;
* brightness / contrast: PIL's blend formula for all 256 input values (a LUT): bit-identical;
* luma (contrast mean, saturation, grayscale): Pillow's fixed-point ``(19595 R + 38470 G + 7471 B +
  0x8000) >> 16`` as one float32 affine map (every partial sum an integer < 2^24): bit-identical;
* saturation: Pillow's float32 blend with truncation: bit-identical;
* hue: Pillow's 8-bit HSV round trip. RGB -> HSV is table lookups (H from (r - g, g - b), S from
  (max, min)); HSV -> RGB is, per channel, Pillow's ``round(v K / 255)`` (K = 255, 255 - s, 255 - fs
  or 255 - s + fs by the hue sector) as the 24-bit fixed point ``(v M + 2^23) >> 24``, M one table
  row per (h, s); 1.3 MB of tables built once per process in ~0.1 s from ``pretrain.augment.device``'s
  exact code; both directions checked on all 2^24 inputs: bit-identical;
* blur: Pillow's six fixed-point box passes (rows, then columns). At whole radius 0 (sigma < sqrt 2)
  each pass is ``round(x + c D)``, D the second difference, one float32 multiply-add that provably
  rounds like Pillow's shift wherever a per-sigma check on all 1021 D passes (~97.5% of sigmas);
  otherwise one float64 column filter whose sums of multiples of 2^-24 are exact, then truncation:
  bit-identical;
* flip, then uint8 -> float conversion fused with the normalisation.

The image is decoded once by the dataset and shared by both views, as in the reference.
OpenCV is limited to one thread per process: the loader parallelises over images.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms

from moco_d2.core.images import IMAGENET_MEAN, IMAGENET_STD
from pretrain.augment import device as G
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


_LEVELS = np.arange(256, dtype=np.float32)


def _blend_lut(base: float, factor: float) -> np.ndarray:
    """PIL's ``Image.blend(constant base, img, factor)`` for every uint8 value (float32, truncation)."""
    values = np.float32(base) + np.float32(factor) * (_LEVELS - np.float32(base))
    np.floor(values, out=values)
    np.maximum(values, 0, out=values)  # np.minimum / np.maximum: np.clip's wrapper costs more here
    return np.minimum(values, 255, out=values).astype(np.uint8)


# Pillow's luma as one affine map on float32 levels, scaled by 2^-16: every partial sum is a multiple
# of 2^-16 below 2^8 (24 bits), so exact.
_LUMA_AFFINE = np.array([[*G.LUMA_FIXED, 0x8000]], dtype=np.float32) * np.float32(2.0**-16)


def _luma_levels(x: np.ndarray) -> np.ndarray:
    """Pillow's luma of an HxWx3 array of levels (uint8 or float32) as HxW float32 integer levels."""
    lum = cv2.transform(x if x.dtype == np.float32 else x.astype(np.float32), _LUMA_AFFINE)
    return np.floor(lum, out=lum)  # (19595 R + 38470 G + 7471 B + 0x8000) >> 16


def luma(x: np.ndarray) -> np.ndarray:
    """PIL's ``convert("L")`` exactly: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, HxW uint8."""
    return _luma_levels(x).astype(np.uint8)


def adjust_brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return cv2.LUT(x, _blend_lut(0.0, factor))


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    mean = int(cv2.mean(_luma_levels(x))[0] + 0.5)  # PIL rounds the mean luma to an integer
    return cv2.LUT(x, _blend_lut(mean, factor))


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    """PIL's ``Image.blend(gray, x, factor)``: float32 ``gray + factor (x - gray)``, truncated."""
    v = x.astype(np.float32)
    gray = cv2.cvtColor(_luma_levels(v), cv2.COLOR_GRAY2RGB)  # HxWx3 float32, no broadcasting pass
    v -= gray
    v *= np.float32(factor)
    v += gray
    return np.clip(v, 0, 255, out=v).astype(np.uint8)  # astype truncates like PIL's (UINT8) cast


class _HueTables:
    """Lookup tables for Pillow's 8-bit HSV round trip, built once per process (~0.1 s, 1.3 MB) from
    the exact vectorised code in ``pretrain.augment.device`` (``pil_rgb_to_hsv``; ``pil_hsv_to_rgb``'s formulas).

    * H depends only on the differences (r - g, g - b): ``h[(r - g + 255) * 511 + (g - b + 255)]``
      (511² uint8 = 261 KB; unreachable pairs hold 0);
    * S depends only on (max, min): ``s[max * 256 + min]`` (64 KB); V is the max;
    * back to RGB, each channel is ``round(v K / 255)`` with K = 255, 255 - s, 255 - fs or 255 - s + fs
      (v, p, q or t) picked by H's sector; ``rgb_scale[h * 256 + s]`` holds each channel's K as the
      24-bit fixed-point factor ``rint(2^24 K / 255)`` (65536 rows of 4 uint32, the 4th unused: 1 MB).
    """

    def __init__(self) -> None:
        d = np.arange(-255, 256)
        rg, gb = np.meshgrid(d, d, indexing="ij")
        b = np.maximum(0, np.maximum(-gb, -(rg + gb)))  # the darkest colour with these differences
        g = b + gb
        r = g + rg
        valid = np.maximum(r, np.maximum(g, b)) <= 255
        rgb = (torch.from_numpy(np.where(valid, c, 0).astype(np.int32)) for c in (r, g, b))
        h = G.pil_rgb_to_hsv(*rgb)[0].numpy()
        self.h = np.where(valid, h, 0).astype(np.uint8).ravel()
        mx, mn = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
        valid = mn <= mx
        mx_t = torch.from_numpy(mx.astype(np.int32))
        mn_t = torch.from_numpy(np.where(valid, mn, 0).astype(np.int32))
        s = G.pil_rgb_to_hsv(mx_t, mn_t, mn_t)[1].numpy()
        self.s = np.where(valid, s, 0).astype(np.uint8).ravel()
        self.rgb_scale = _rgb_scale_table()


def _rgb_scale_table() -> np.ndarray:
    """hsv2rgb's per-channel factor K / 255 for every (h, s), as ``rint(2^24 K / 255)``: 65536 x 4 uint32.

    Pillow computes ``fs = f * s`` in float32 (f from h in double, stored as float) and rounds
    ``v K / 255`` in double, half up. No ``v K / 255`` lies within 1.4e-5 of a half-integer (none on
    one), while ``v rint(2^24 K / 255) / 2^24`` is off by at most 255 * 2^-25 < 7.6e-6, so
    ``(v M + 2^23) >> 24`` rounds the same way: checked against Pillow on all 2^24 (h, s, v)."""
    hd = np.arange(256, dtype=np.float64) * 6.0 / 255.0  # (float)h * 6.0 / 255.0, in double
    i = np.floor(hd)
    f = (hd - i).astype(np.float32)  # f = (float)(... - (float)i)
    sector = i.astype(np.int64) % 6
    h, s = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    fs = (f[h] * s.astype(np.float32)).astype(np.float64)  # float32 product, then promoted
    k = {"v": np.full(h.shape, 255.0), "p": 255.0 - s, "q": 255.0 - fs, "t": 255.0 - s + fs}
    pick = ("vtp", "qvp", "pvt", "pqv", "tpv", "vpq")  # per sector, the source of R, G and B
    table = np.zeros((256, 256, 4), dtype=np.uint32)
    for c in range(3):
        choice = np.array([k[pick[sector[row]][c]][row] for row in range(256)])
        table[..., c] = np.rint(choice * 2.0**24 / 255.0)  # at most 2^24: v M + 2^23 < 2^32
    return table.reshape(-1, 4)


_hue_tables: _HueTables | None = None


def hue_tables() -> _HueTables:
    global _hue_tables
    if _hue_tables is None:
        _hue_tables = _HueTables()
    return _hue_tables


# (r - g + 255) * 511 + (g - b + 255) as one affine map on float32 levels (exact: integers < 2^18)
_HUE_INDEX = np.array([[511.0, -510.0, -1.0, 255.0 * 511 + 255]], dtype=np.float32)


def rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's 8-bit RGB -> HSV (Convert.c ``rgb2hsv_row``) of an HxWx3 uint8 array: three HxW uint8
    arrays from table lookups (``_HueTables``). Checked on all 2^24 colours."""
    tab = hue_tables()
    index = cv2.transform(x.astype(np.float32), _HUE_INDEX).astype(np.intp)
    r, g, b = cv2.split(x)
    v = cv2.max(cv2.max(r, g), b)
    max_min = cv2.merge((cv2.min(cv2.min(r, g), b), v)).view("<u2")[..., 0]  # max * 256 + min
    return tab.h.take(index), tab.s.take(max_min), v


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pillow's 8-bit HSV -> RGB (Convert.c ``hsv2rgb``) of three HxW uint8 arrays, HxWx3 uint8 out.

    Each channel is ``(v M + 2^23) >> 24`` in uint32 with M the channel's fixed-point factor for
    (h, s) from one table row (``_rgb_scale_table``: exact on all 2^24 HSV triples). Grey (s = 0)
    needs no branch: every factor is 255 / 255."""
    index = cv2.merge((s, h)).view("<u2")[..., 0]  # h * 256 + s: the bytes (s, h) read little-endian
    m = hue_tables().rgb_scale.take(index, axis=0)  # HxWx4 uint32: one 16-byte row per pixel
    np.multiply(m, cv2.merge((v, v, v, v)), out=m)
    m += np.uint32(1 << 23)
    out = np.empty((*h.shape, 3), dtype=np.uint8)
    return cv2.mixChannels([m.view(np.uint8)], [out], _TOP_BYTES)[0]  # the >> 24: one byte copy


# Where the top byte of each of a row's first three uint32 lies among its 16 bytes -> output channel.
_TOP = 3 if sys.byteorder == "little" else 0
_TOP_BYTES = [_TOP, 0, 4 + _TOP, 1, 8 + _TOP, 2]


def adjust_hue(x: np.ndarray, hue_factor: float) -> np.ndarray:
    """torchvision's PIL ``adjust_hue`` bit for bit: Pillow's 8-bit HSV round trip, the H channel
    shifted by ``np.int32(hue * 255)`` mod 256. About 0.3 ms for a 224² view (the torch version in
    ``pretrain.augment.device``, kept for the device, takes ~20x longer on a CPU core)."""
    steps = np.uint8(np.int32(hue_factor * 255).astype(np.uint8))  # no shortcut at 0: the trip is lossy
    h, s, v = rgb_to_hsv(x)
    h += steps  # uint8: wraps mod 256
    return hsv_to_rgb(h, s, v)


def to_grayscale(x: np.ndarray, channels: int = 3) -> np.ndarray:
    """PIL's ``convert("L")`` as HxWx``channels`` (1: for ops that then need one channel, not three)."""
    gray = luma(x)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB) if channels == 3 else gray[..., None]


def pil_box_radius(sigma: float, passes: int = G.BLUR_PASSES) -> np.float32:
    """Pillow's ``_gaussian_blur_radius`` (BoxBlur.c) on one sigma, as C computes it: float32
    variables, double ``sqrt`` / ``floor`` where C promotes. numpy float32 scalars round every
    operation to float32 like C; a torch call per scalar would cost ~20x more."""
    f32 = np.float32
    r = f32(sigma)  # the Python float reaches C as a float
    s2 = r * r / f32(passes)
    big = f32(math.sqrt(12.0 * float(s2) + 1.0))  # 12.0 * sigma2 + 1.0 is double in C
    whole = f32(math.floor((float(big) - 1.0) / 2.0))
    a = (f32(2) * whole + f32(1)) * (whole * (whole + f32(1)) - f32(3) * s2)
    a = a / (f32(6) * (s2 - (whole + f32(1)) * (whole + f32(1))))
    return whole + a


def pil_box_weights(sigma: float) -> tuple[int, int, int]:
    """Pillow's box-pass weights for ``GaussianBlur(radius=sigma)``: (int radius, ww, fw), 2^-24 units
    (ImagingHorizontalBoxBlur: ``ww = (UINT32)((1 << 24) / (radius * 2 + 1))`` in float32)."""
    radius = pil_box_radius(sigma)
    whole = int(radius)  # C's (int) truncation; the radius is positive
    ww = int(np.float32(1 << 24) / (radius * np.float32(2) + np.float32(1)))
    return whole, ww, ((1 << 24) - (2 * whole + 1) * ww) // 2


# Every second difference x[i-1] + x[i+1] - 2 x[i] of uint8 values.
_SECOND_DIFFERENCES = np.arange(-510, 511, dtype=np.int64)


def _unit_box_factor(fw: int) -> float | None:
    """The factor that makes a whole-radius-0 box pass one rounded multiply-add, or None where that
    would not be exact (~2.5% of sigmas; the caller then takes the general path).

    The pass is ``(ww x + fw (x[i-1] + x[i+1]) + 2^23) >> 24``; with the second difference D and
    ``eps = 2^24 - ww - 2 fw`` (0 or 1) it is ``x + ((fw D + 2^23 - eps x) >> 24)``. If every
    ``r = (fw D + 2^23) mod 2^24`` lies in [2^9, 2^24 - 2^9] (checked on all 1021 D), then ``eps x``
    (<= 255) cannot move the shift, and ``x + c D`` with ``c = fw 2^-24`` stays at least 2^-15 from a
    half-integer: OpenCV's float32 ``x + c D`` (|.| < 512, so off by under 0.75 * 2^-15 with or
    without a fused multiply-add) rounds to ``x + round(c D)``, the pass, exactly."""
    residue = (fw * _SECOND_DIFFERENCES + (1 << 23)) & ((1 << 24) - 1)
    if int(residue.min()) < 1 << 9 or int(residue.max()) > (1 << 24) - (1 << 9):
        return None
    return fw * 2.0**-24  # exact in float32: fw < 2^23


def _unit_box_passes(q: np.ndarray, offset: int, line: int, factor: float) -> None:
    """Pillow's three whole-radius-0 box passes on a flat int16 array of levels, in place: lines of
    ``line`` values, each pixel's neighbours ``offset`` values away (rows of an H x 3W image: 3 in
    lines of 3W; its columns: 3W in one line). ``q = round(q + factor * D)``, D from the first
    differences with zeros off both ends of each line, which is edge replication."""
    size = q.size
    step = np.zeros(size + offset, dtype=np.int16)  # step[j] = q[j] - q[j - offset] inside a line
    starts = step[:size].reshape(-1, line)[:, :offset]  # the first `offset` values of each line: 0
    d = np.empty_like(q)
    for _ in range(G.BLUR_PASSES):
        np.subtract(q[offset:], q[:-offset], out=step[offset:size])
        starts[...] = 0
        np.subtract(step[offset:], step[:-offset], out=d)  # q[j + offset] + q[j - offset] - 2 q[j]
        cv2.addWeighted(q, 1.0, d, factor, 0.0, dst=q, dtype=cv2.CV_16S)


_IDENTITY = np.ones(1)


def _column_box_passes(y: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Pillow's three box passes down the columns of a 2-D uint8 array: float64 sums of multiples of
    2^-24 below 2^8 are exact, the +0.5 is ``delta``, so truncating to uint8 is Pillow's shift."""
    for _ in range(G.BLUR_PASSES):
        y = cv2.sepFilter2D(y, cv2.CV_64F, _IDENTITY, kernel, delta=0.5, borderType=cv2.BORDER_REPLICATE)
        y = y.astype(np.uint8)
    return y


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Pillow's GaussianBlur exactly: three box passes along rows then three along columns, each
    ``(ww * window + fw * (two far pixels) + 2^23) >> 24`` with edge replication; HxWxC uint8.

    Whole radius 0 (sigma < sqrt 2: the demo's range, 70% of the default one) where the checked factor
    exists: each pass is two int16 differences and one rounded float32 multiply-add
    (``_unit_box_factor``), ~2.5x faster than the general path. Otherwise each pass is one exact
    float64 column filter (``_column_box_passes``)."""
    whole, ww, fw = pil_box_weights(sigma)
    factor = _unit_box_factor(fw) if whole == 0 else None
    if factor is not None:
        q = x.astype(np.int16).ravel()
        line = x.shape[1] * x.shape[2]
        _unit_box_passes(q, x.shape[2], line, factor)  # rows: the next pixel is C values on
        _unit_box_passes(q, line, q.size, factor)  # columns: the next row is W C values on
        return q.astype(np.uint8).reshape(x.shape)
    kernel = np.array([fw] + [ww] * (2 * whole + 1) + [fw], dtype=np.float64) * 2.0**-24
    height, width, channels = x.shape
    # every pass filters the columns of one channel, OpenCV's fastest float64 case (~25% faster than
    # filter2D): the rows as the columns of the transposed image, then the columns
    y = _column_box_passes(cv2.transpose(x).reshape(width, height * channels), kernel)
    y = cv2.transpose(y.reshape(width, height, channels)).reshape(height, width * channels)
    return _column_box_passes(y, kernel).reshape(x.shape)


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
        self._planes = [
            (np.float32(o), np.float32(c)) for o, c in zip(self.offset.view(3), self.scale.view(3))
        ]
        self._offsets = self.offset.numpy()  # 3x1x1 float32, broadcast over a small view
        self._scales = self.scale.numpy()

    def __call__(self, x: np.ndarray) -> Tensor:
        out = torch.empty((3, x.shape[0], x.shape[1]), dtype=torch.float32)
        planes = out.numpy()
        if x.shape[0] * x.shape[1] <= 64 * 64:  # small views: two calls beat the per-plane loop
            np.subtract(x.transpose(2, 0, 1), self._offsets, out=planes, dtype=np.float32)
            planes *= self._scales
            return out
        for plane, channel, (offset, scale) in zip(planes, cv2.split(x), self._planes):
            np.subtract(channel, offset, out=plane, dtype=np.float32)  # per plane: no strided pass
            plane *= scale
        return out


def _f32(p: float) -> float:
    """``p`` rounded to float32: torch compares a float32 tensor with a Python float in float32."""
    return float(np.float32(p))


def _rand_below(p: float) -> bool:
    """``torch.rand(1) < p``, the draw behind RandomGrayscale / RandomHorizontalFlip, without the
    tensor comparison (the same float32 comparison on Python floats)."""
    return torch.rand(1).item() < _f32(p)


def _random_apply(p: float) -> bool:
    """``transforms.RandomApply(p)``'s draw: it applies unless ``p < torch.rand(1)`` (float32)."""
    return not torch.rand(1).item() > _f32(p)


# RandomResizedCrop.get_params's ``torch.log(torch.tensor(ratio))``: float32 values, passed on as floats
_LOG_RATIO = tuple(float(v) for v in torch.log(torch.tensor(CROP_RATIO)))


def sample_crop(height: int, width: int, scale: Sequence[float]) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` for an image of this size: (top, left, crop_h, crop_w).

    The same torch draws in the same order with the same arguments, and the same double arithmetic;
    only the per-call tensor bookkeeping (dummy image, ratio tensor, 0-d indexing) is gone."""
    area = height * width
    lo, hi = float(scale[0]), float(scale[1])
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(lo, hi).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(*_LOG_RATIO)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = float(width) / float(height)  # fallback: a central crop
    if in_ratio < min(CROP_RATIO):
        w, h = width, int(round(width / min(CROP_RATIO)))
    elif in_ratio > max(CROP_RATIO):
        h, w = height, int(round(height * max(CROP_RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class FastTwoViewTransform:
    """Two augmented views, the reference recipe's draws and (but for the resize) pixels, 2.1-2.8x
    cheaper on CPU by the machine (224², real photos; ~1.5x at 28²: ``bench/bench_augment.py``)."""

    def __init__(
        self,
        name: str = "mocov2",
        size: int = 224,
        scale: Sequence[float] = (0.2, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        uint8_output: bool = False,
        blur_sigma: Sequence[float] = BLUR_SIGMA,
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
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

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
            gray = _rand_below(0.2)
            if gray:  # the blur then filters one channel: the three are equal
                x = to_grayscale(x, channels=1)
            if _random_apply(0.5):
                x = gaussian_blur(x, random.uniform(*self.blur_sigma))
            if gray:
                x = cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)
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
        out = torch.from_numpy(resized_crop(src, top, left, h, w, self.size)).permute(2, 0, 1)
        if _rand_below(0.5):
            out = out.flip(-1)
        return out  # CHW view of HWC memory; the loader's collate copies it into the batch anyway

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale})"
