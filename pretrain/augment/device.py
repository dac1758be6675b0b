"""Device half of the MoCo augmentation: colour jitter, grayscale, blur and normalisation on a batch.

The CPU loader (``pretrain.augment.fast.CropFlipTwoView``) only crops, resizes and flips, and ships
uint8 tensors; this module finishes the recipe on the accelerator (or on the CPU, same code, for
tests). Every random parameter is drawn PER SAMPLE from an explicit ``torch.Generator``, with the
reference recipe's distributions:

* mocov2 (aug+): ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 (a uniformly random order of the four
  ops per sample), RandomGrayscale(p=0.2), GaussianBlur sigma~U[0.1, 2] with p=0.5;
* mocov1: RandomGrayscale(p=0.2), then ColorJitter(0.4, 0.4, 0.4, 0.4) always.

The ops follow Pillow's definitions (which the reference uses) in float arithmetic: the same luma
weights, contrast around the mean luma, hue shifts quantised to 1/255 turn like torchvision's PIL
backend, and Pillow's blur kernel (three extended box filters, see ``fast_augment.pil_blur_kernel``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.augment.reference import BLUR_SIGMA, aug_settings

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")


def luma(x: Tensor) -> Tensor:
    """Bx3xHxW -> Bx1xHxW."""
    w = x.new_tensor(LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (mean + f * (x - mean)).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    gray = luma(x)
    f = _per_sample(factor)
    return (gray + f * (x - gray)).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each sample by ``shift`` turns (exact float HSV round trip)."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = torch.where(
        maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc)
    )
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    hue6 = torch.remainder(hue + 6.0 * shift.view(-1, 1, 1), 6.0)  # hue in sextants, shifted
    # HSV -> RGB in closed form: channel n (R=5, G=3, B=1) is v - v s clamp(min(k, 4 - k), 0, 1).
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue6, 6.0)
        out.append(maxc - maxc * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(out, dim=1)


def to_grayscale(x: Tensor) -> Tensor:
    return luma(x).expand_as(x).contiguous()


def pil_blur_kernels(sigma: Tensor, passes: int = 3) -> Tensor:
    """Pillow's GaussianBlur 1-D kernels for a batch of sigmas: B x L, centred, zero padded.

    Same construction as ``fast_augment.pil_blur_kernel``: ``passes`` extended boxes of variance
    sigma²/passes each (Gwosdek et al. 2011), convolved together.
    """
    var = (sigma.double() ** 2) / passes
    length = torch.sqrt(12.0 * var + 1.0)
    whole = torch.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    inner = 1.0 / (2.0 * (whole + frac) + 1.0)
    edge = (1.0 - (2 * whole + 1) * inner) / 2.0
    half = int(whole.max().item()) + 1  # half-width of the widest box
    offsets = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float64).abs()
    w = whole.view(-1, 1)
    box = torch.where(offsets <= w, inner.view(-1, 1), torch.where(offsets == w + 1, edge.view(-1, 1), 0.0))
    kernel = box
    batch = box.shape[0]
    for _ in range(passes - 1):
        # full convolution of each sample's kernel with its own box (both symmetric)
        padded = F.pad(kernel, (2 * half, 2 * half)).unsqueeze(0)  # 1 x B x L
        kernel = F.conv1d(padded, box.unsqueeze(1), groups=batch).squeeze(0)
    return kernel.float()


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable per-sample blur with Pillow's kernel and edge replication."""
    batch, channels, height, width = x.shape
    kernel = pil_blur_kernels(sigma.to(x.device)).to(x.dtype)  # B x L
    size = kernel.shape[1]
    pad = size // 2
    weight = kernel.repeat_interleave(channels, dim=0)  # (B*C) x L
    y = x.reshape(1, batch * channels, height, width)
    y = F.conv2d(
        F.pad(y, (pad, pad, 0, 0), mode="replicate"), weight.view(-1, 1, 1, size), groups=batch * channels
    )
    y = F.conv2d(
        F.pad(y, (0, 0, pad, pad), mode="replicate"), weight.view(-1, 1, size, 1), groups=batch * channels
    )
    return y.view(batch, channels, height, width)


class Normalize(nn.Module):
    """``forward(x_uint8 [B,3,H,W], generator=None)``: the float normalisation of ``AUG.IMPL fast``'s
    uint8 views on the device, with the CPU path's formula, ``(x - 255 mean) / (255 std)``; keeps the
    memory format. The generator is unused (nothing random is left); it matches ``GPUAugment``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        offset = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 Bx3xHxW batch, got {x.dtype} {tuple(x.shape)}")
        return x.float().sub_(self.offset).mul_(self.scale)  # float() keeps channels_last


class GPUAugment(nn.Module):
    """``forward(x_uint8 [B,3,H,W], generator) -> normalised float [B,3,H,W]`` with per-sample draws."""

    def __init__(
        self,
        name: str = "mocov2",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        if name not in ("mocov2", "mocov1"):
            raise ValueError(f"unknown augmentation recipe {name!r}")
        self.name = name
        # the reference's (brightness, contrast, saturation, hue) strengths and probabilities
        self.jitter = (0.4, 0.4, 0.4, 0.1) if name == "mocov2" else (0.4, 0.4, 0.4, 0.4)
        self.p_jitter = 0.8 if name == "mocov2" else 1.0
        self.p_gray = 0.2
        self.p_blur = 0.5 if name == "mocov2" else 0.0
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, aug_cfg: Any) -> GPUAugment:
        s = aug_settings(aug_cfg)
        return cls(s["name"], s["mean"], s["std"])

    def sample_params(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draw every random parameter for ``batch`` samples (on the generator's device)."""
        device = generator.device if generator is not None else torch.device("cpu")

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(batch, generator=generator, device=device)

        b, c, s, h = self.jitter
        hue = uniform(-h, h)
        return {
            "jitter": torch.rand(batch, generator=generator, device=device) < self.p_jitter,
            # a uniformly random permutation of (brightness, contrast, saturation, hue) per sample
            "order": torch.rand(batch, 4, generator=generator, device=device).argsort(dim=1),
            "brightness": uniform(1 - b, 1 + b),
            "contrast": uniform(1 - c, 1 + c),
            "saturation": uniform(1 - s, 1 + s),
            # torchvision's PIL backend shifts the 8-bit hue channel by int(hue * 255) steps
            "hue": torch.trunc(hue * 255.0) / 255.0,
            "gray": torch.rand(batch, generator=generator, device=device) < self.p_gray,
            "blur": torch.rand(batch, generator=generator, device=device) < self.p_blur,
            "sigma": uniform(*BLUR_SIGMA),
        }

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply the recipe with given parameters to a float batch in [0, 1] (no normalisation)."""
        p = {k: v.to(x.device) for k, v in params.items()}
        x = x.clone()  # the ops below write the selected samples in place

        def gray(sub: Tensor, idx: Tensor) -> Tensor:
            return to_grayscale(sub)

        if self.name == "mocov1":
            x = self._where(p["gray"], x, gray)
            return self._jitter(x, p)
        x = self._jitter(x, p)
        x = self._where(p["gray"], x, gray)
        return self._where(p["blur"], x, lambda sub, idx: gaussian_blur(sub, p["sigma"][idx]))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 Bx3xHxW batch, got {x.dtype} {tuple(x.shape)}")
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        params = self.sample_params(x.shape[0], generator)
        out = self.apply(x.float().div_(255.0), params)  # apply() clones: one extra batch copy
        out = (out - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    @staticmethod
    def _where(mask: Tensor, x: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``x[mask] = fn(x[mask], indices)`` in place: no work for the unselected samples."""
        idx = mask.nonzero().squeeze(1)
        if idx.numel() > 0:
            x[idx] = fn(x[idx], idx)
        return x

    def _jitter(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        ops = (
            lambda sub, idx: adjust_brightness(sub, p["brightness"][idx]),
            lambda sub, idx: adjust_contrast(sub, p["contrast"][idx]),
            lambda sub, idx: adjust_saturation(sub, p["saturation"][idx]),
            lambda sub, idx: adjust_hue(sub, p["hue"][idx]),
        )
        for position in range(4):
            for op_id, op in enumerate(ops):
                x = self._where(p["jitter"] & (p["order"][:, position] == op_id), x, op)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def build_gpu_augment(aug_cfg: Any, device: torch.device | str) -> GPUAugment:
    """The device-side module for ``AUG.IMPL: gpu``, already moved to ``device``."""
    return GPUAugment.from_config(aug_cfg).to(device)


def build_device_stage(aug_cfg: Any, device: torch.device | str) -> nn.Module | None:
    """What the device adds to the loader's views, ``module(views_uint8, generator) -> float views``:
    ``GPUAugment`` for ``AUG.IMPL gpu``; on CUDA, ``Normalize`` for ``fast`` (its loader then ships uint8,
    see ``normalize_on_device``); nothing otherwise (the loader ships finished float views)."""
    s = aug_settings(aug_cfg)
    if s["impl"] == "gpu":
        return GPUAugment(s["name"], s["mean"], s["std"]).to(device)
    if normalize_on_device(aug_cfg, device):
        return Normalize(s["mean"], s["std"]).to(device)
    return None


def normalize_on_device(aug_cfg: Any, device: torch.device | str) -> bool:
    """Whether ``AUG.IMPL fast`` leaves the normalisation to the device: on CUDA, where it saves the
    workers a float pass and cuts the pinned memory and host-to-device copy fourfold."""
    return aug_settings(aug_cfg)["impl"] == "fast" and torch.device(device).type == "cuda"
