"""Device half of the MoCo augmentation: colour jitter, grayscale, blur and normalisation on a batch.

The CPU loader (``pretrain.augment.fast.CropFlipTwoView``) only crops, resizes and flips, and ships
uint8 tensors; this module finishes the recipe on the accelerator (or on the CPU, same code, for
tests). Every random parameter is drawn PER SAMPLE from an explicit ``torch.Generator``, with the
reference recipe's distributions:

* mocov2 (aug+): ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 (a uniformly random order of the four
  ops per sample), RandomGrayscale(p=0.2), GaussianBlur sigma~U[0.1, 2] with p=0.5;
* mocov1: RandomGrayscale(p=0.2), then ColorJitter(0.4, 0.4, 0.4, 0.4) always.

The ops work on integer 8-bit levels (int32/int64 tensors) with Pillow's own arithmetic, so for the
same parameters they give the reference's pixels bit for bit: the fixed-point luma, ``Image.blend``'s
float32 formula with truncation (brightness, contrast around the rounded mean luma, saturation), the
8-bit HSV round trip for hue (``pil_rgb_to_hsv`` / ``pil_hsv_to_rgb``, checked on all 2^24 inputs;
shifts of whole 1/255 turns, as torchvision's PIL backend), and Pillow's blur as six fixed-point box
passes (``pil_gaussian_blur``). ``GPUAugment`` is sync-free: every op runs on the whole batch and
``torch.where`` keeps it per sample, and the blur uses a fixed tap count, so nothing is read back to
the host. (The CPU path, ``pretrain.augment.fast``, reuses these definitions but does hue with lookup
tables built from them and the blur with OpenCV: the torch versions cost ~10x more on one core.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.augment.reference import BLUR_SIGMA, aug_settings

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")
# Pillow's fixed-point luma: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16
LUMA_FIXED = (19595, 38470, 7471)
BLUR_PASSES = 3


def pil_luma(r: Tensor, g: Tensor, b: Tensor) -> Tensor:
    """Pillow's ``convert("L")`` on integer tensors (any integer dtype wide enough for 2^24)."""
    return (r * LUMA_FIXED[0] + g * LUMA_FIXED[1] + b * LUMA_FIXED[2] + 0x8000) >> 16


def pil_blend(base: Tensor, x: Tensor, alpha: Tensor) -> Tensor:
    """Pillow's ``Image.blend(base, x, alpha)`` on integer tensors: float32 ``base + alpha (x - base)``,
    truncated and clipped to [0, 255] (ImagingBlend), returned as int32."""
    v = base.float() + alpha.float() * (x - base).float()
    return v.trunc().clamp_(0.0, 255.0).int()


def _c_round(x: Tensor) -> Tensor:
    """C ``round()`` (half away from zero) of non-negative float64 values, exactly."""
    f = x.floor()
    return f + ((x - f) >= 0.5).to(x.dtype)


def pil_rgb_to_hsv(r: Tensor, g: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pillow's 8-bit RGB -> HSV (libImaging/Convert.c ``rgb2hsv_row``), float32/float64 as in C.

    Checked bit-exact against Pillow on all 2^24 colours (int32 tensors in, int32 out)."""
    maxc = torch.maximum(r, torch.maximum(g, b))
    minc = torch.minimum(r, torch.minimum(g, b))
    cr = (maxc - minc).float()
    grey = cr == 0
    safe = torch.where(grey, torch.ones_like(cr), cr)
    s = cr / torch.where(maxc > 0, maxc, torch.ones_like(maxc)).float()
    rc, gc, bc = ((maxc - c).float() / safe for c in (r, g, b))
    h = torch.where(
        r == maxc,
        (bc - gc).double(),
        torch.where(g == maxc, 2.0 + rc.double() - bc.double(), 4.0 + gc.double() - rc.double()),
    ).float()
    h = torch.fmod(h.double() / 6.0 + 1.0, 1.0).float()
    uh = (h.double() * 255.0).trunc().clamp_(0, 255).int()
    us = (s.double() * 255.0).trunc().clamp_(0, 255).int()
    zero = torch.zeros_like(uh)
    return torch.where(grey, zero, uh), torch.where(grey, zero, us), maxc.int()


def pil_hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pillow's 8-bit HSV -> RGB (libImaging/Convert.c ``hsv2rgb``); bit-exact on all 2^24 triples."""
    hd = h.double() * 6.0 / 255.0
    i = hd.floor()
    fs = (hd - i).float() * s.float()
    vd, sd, fsd = v.double(), s.double(), fs.double()
    p = _c_round(vd * (255.0 - sd) / 255.0).clamp_(0, 255).int()
    q = _c_round(vd * (255.0 - fsd) / 255.0).clamp_(0, 255).int()
    t = _c_round(vd * (255.0 - sd + fsd) / 255.0).clamp_(0, 255).int()
    i = i.int() % 6
    v = v.int()

    def pick(*options: Tensor) -> Tensor:
        out = options[5]
        for k in range(4, -1, -1):
            out = torch.where(i == k, options[k], out)
        return torch.where(s == 0, v, out)

    return pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)


def hue_shift_steps(hue_factor: Tensor) -> Tensor:
    """torchvision's PIL hue shift in 1/255 turns: ``np.int32(hue * 255)`` wrapped to uint8."""
    return torch.trunc(hue_factor * 255.0).int() & 255


def pil_adjust_hue(r: Tensor, g: Tensor, b: Tensor, steps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torchvision's ``adjust_hue`` on PIL images: Pillow's HSV round trip, H += steps (mod 256)."""
    h, s, v = pil_rgb_to_hsv(r, g, b)
    return pil_hsv_to_rgb((h + steps) & 255, s, v)


def pil_box_radius(sigma: Tensor, passes: int = BLUR_PASSES) -> Tensor:
    """Pillow's ``_gaussian_blur_radius`` (float32, Gwosdek et al. 2011) for float32 sigmas."""
    r = sigma.float()
    s2 = r * r / passes
    big = torch.sqrt(12.0 * s2.double() + 1.0).float()
    whole = torch.floor((big.double() - 1.0) / 2.0).float()
    a = (2 * whole + 1) * (whole * (whole + 1) - 3 * s2)
    a = a / (6 * (s2 - (whole + 1) * (whole + 1)))
    return whole + a


def pil_box_weights(radius: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ImagingHorizontalBoxBlur's fixed-point weights: (int radius, inner weight ww, edge weight fw)."""
    whole = radius.trunc().long()
    ww = torch.trunc(16777216.0 / (radius * 2 + 1)).long()
    fw = (16777216 - (2 * whole + 1) * ww) // 2
    return whole, ww, fw


# the widest box Pillow uses for sigma <= BLUR_SIGMA[1] (the default recipe's; see max_box_radius)
MAX_BOX_RADIUS = int(pil_box_radius(torch.tensor([BLUR_SIGMA[1]]))[0])


def max_box_radius(sigma_max: float) -> int:
    """The widest box Pillow uses for sigmas up to ``sigma_max``: a fixed tap count, so no host sync."""
    return int(pil_box_radius(torch.tensor([float(sigma_max)]))[0])


def box_blur_pass(
    x: Tensor, whole: Tensor, ww: Tensor, fw: Tensor, dim: int, max_radius: int = MAX_BOX_RADIUS
) -> Tensor:
    """One Pillow box pass along ``dim`` of an int64 batch, per-sample weights of shape (B, 1, 1, 1):
    ``(ww * sum(|k| <= r) + fw * (x[-r-1] + x[r+1]) + 2^23) >> 24`` with edge replication
    (``max_radius`` >= every sample's whole radius)."""
    half = max_radius + 1
    n = x.shape[dim]
    idx = torch.arange(-half, n + half, device=x.device).clamp_(0, n - 1)
    padded = x.index_select(dim, idx)
    acc = torch.full_like(x, 1 << 23)
    for k in range(-half, half + 1):
        tap = padded.narrow(dim, k + half, n)
        w = torch.where(whole >= abs(k), ww, torch.where(whole + 1 == abs(k), fw, torch.zeros_like(ww)))
        acc += tap * w
    return acc >> 24


def pil_gaussian_blur(x: Tensor, sigma: Tensor, max_radius: int = MAX_BOX_RADIUS) -> Tensor:
    """Pillow's ``GaussianBlur(radius=sigma)`` on an integer Bx3xHxW batch, per-sample sigma: three
    box passes along the rows, then three along the columns, each rounded to 8 bits. Exact."""
    whole, ww, fw = (v.view(-1, 1, 1, 1) for v in pil_box_weights(pil_box_radius(sigma)))
    y = x.long()
    for dim in (3, 2):
        for _ in range(BLUR_PASSES):
            y = box_blur_pass(y, whole, ww, fw, dim, max_radius)
    return y.int()


def luma(x: Tensor) -> Tensor:
    """Bx3xHxW integer levels -> Bx1xHxW integer luma, Pillow's ``convert("L")``."""
    r, g, b = x.unbind(dim=1)
    return pil_luma(r, g, b).unsqueeze(1)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


# The ops below take and return int32 Bx3xHxW batches of 8-bit levels and follow Pillow exactly.


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return pil_blend(torch.zeros_like(x), x, _per_sample(factor))


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    # ImageEnhance.Contrast: int(mean luma + 0.5), the mean as Python computes it (double)
    lum = luma(x)
    mean = lum.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.int64).double() / lum[0].numel()
    return pil_blend(torch.floor(mean + 0.5).int(), x, _per_sample(factor))


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return pil_blend(luma(x), x, _per_sample(factor))


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Hue shift by ``shift`` (a multiple of 1/255 turn, as ``sample_params`` draws it) via Pillow's HSV."""
    steps = torch.round(shift * 255.0).int() & 255
    return torch.stack(pil_adjust_hue(*x.unbind(dim=1), steps.view(-1, 1, 1)), dim=1)


def to_grayscale(x: Tensor) -> Tensor:
    return luma(x).expand_as(x).contiguous()


def gaussian_blur(x: Tensor, sigma: Tensor, max_radius: int = MAX_BOX_RADIUS) -> Tensor:
    return pil_gaussian_blur(x, sigma, max_radius)


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
        blur_sigma: Sequence[float] = BLUR_SIGMA,
    ) -> None:
        super().__init__()
        if name not in ("mocov2", "mocov1"):
            raise ValueError(f"unknown augmentation recipe {name!r}")
        self.name = name
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.max_radius = max_box_radius(self.blur_sigma[1])
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
        return cls(s["name"], s["mean"], s["std"], s["blur_sigma"])

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
            "sigma": uniform(*self.blur_sigma),
        }

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply the recipe with given parameters to a float batch in [0, 1] (no normalisation): the
        input is taken to 8-bit levels, processed exactly as Pillow would, and returned in [0, 1]."""
        levels = torch.round(x * 255.0).int()
        return self.apply_levels(levels, params).float().div_(255.0)

    def apply_levels(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The recipe on an integer Bx3xHxW batch of 8-bit levels, in the reference's op order.

        Sync-free: every op runs on the whole batch and ``torch.where`` keeps it for the samples that
        drew it, so nothing depends on values read back to the host (no ``nonzero``, no ``.item()``).
        The flip (drawn and applied by the CPU loader before these ops) commutes exactly with all of
        them: they are per pixel, use the image mean, or are mirror-symmetric box passes with
        mirror-symmetric edge handling, so flipping first gives the reference's pixels bit for bit.
        """
        p = {k: v.to(x.device) for k, v in params.items()}
        x = x.int()
        if self.name == "mocov1":
            x = self._where(p["gray"], x, to_grayscale(x))
            return self._jitter(x, p)
        x = self._jitter(x, p)
        x = self._where(p["gray"], x, to_grayscale(x))
        return self._where(p["blur"], x, gaussian_blur(x, p["sigma"], self.max_radius))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a uint8 Bx3xHxW batch, got {x.dtype} {tuple(x.shape)}")
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        params = self.sample_params(x.shape[0], generator)
        out = self.apply_levels(x, params).float().div_(255.0)
        out = (out - self.mean) / self.std
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    @staticmethod
    def _where(mask: Tensor, x: Tensor, applied: Tensor) -> Tensor:
        """Per sample: ``applied`` where ``mask``, else ``x`` (no data-dependent shapes, no sync)."""
        return torch.where(mask.view(-1, 1, 1, 1), applied, x)

    def _jitter(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        ops = (
            lambda y: adjust_brightness(y, p["brightness"]),
            lambda y: adjust_contrast(y, p["contrast"]),
            lambda y: adjust_saturation(y, p["saturation"]),
            lambda y: adjust_hue(y, p["hue"]),
        )
        for position in range(4):
            step = p["order"][:, position]
            out = x
            for op_id, op in enumerate(ops):
                out = self._where(p["jitter"] & (step == op_id), out, op(x))
            x = out
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, blur_sigma={self.blur_sigma}"


def build_gpu_augment(aug_cfg: Any, device: torch.device | str) -> GPUAugment:
    """The device-side module for ``AUG.IMPL: gpu``, already moved to ``device``."""
    return GPUAugment.from_config(aug_cfg).to(device)


def build_device_stage(aug_cfg: Any, device: torch.device | str) -> nn.Module | None:
    """What the device adds to the loader's views, ``module(views_uint8, generator) -> float views``:
    ``GPUAugment`` for ``AUG.IMPL gpu``; on CUDA, ``Normalize`` for ``fast`` (its loader then ships uint8,
    see ``normalize_on_device``); nothing otherwise (the loader ships finished float views)."""
    s = aug_settings(aug_cfg)
    if s["impl"] == "gpu":
        return GPUAugment(s["name"], s["mean"], s["std"], s["blur_sigma"]).to(device)
    if normalize_on_device(aug_cfg, device):
        return Normalize(s["mean"], s["std"]).to(device)
    return None


def normalize_on_device(aug_cfg: Any, device: torch.device | str) -> bool:
    """Whether ``AUG.IMPL fast`` leaves the normalisation to the device: on CUDA, where it saves the
    workers a float pass and cuts the pinned memory and host-to-device copy fourfold."""
    return aug_settings(aug_cfg)["impl"] == "fast" and torch.device(device).type == "cuda"
