"""Device augmentation path (run on the CPU here: same code): fixed-parameter pixels and batching."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from pretrain.augment import device as G
from pretrain.augment import fast as FA


def natural_image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(
        (size, size), Image.BICUBIC
    )
    arr = np.asarray(base).astype(np.int16) + rng.integers(-12, 13, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def img() -> tuple[Image.Image, torch.Tensor]:
    pil = natural_image(0)
    return pil, torch.from_numpy(np.array(pil)).permute(2, 0, 1).unsqueeze(0).float() / 255


def levels(pil: Image.Image, x: torch.Tensor) -> np.ndarray:
    """|PIL - x| in 8-bit levels; the device path computes in float, PIL truncates to uint8 per op."""
    return np.abs(np.asarray(pil).astype(np.float64) - x[0].permute(1, 2, 0).double().numpy() * 255)


def one(v: float) -> torch.Tensor:
    return torch.tensor([v])


def ints(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255).int()


@pytest.mark.parametrize("factor", [0.6, 0.9, 1.2, 1.4])
def test_linear_ops_are_bit_exact_with_pil(img, factor):
    pil, x = img
    x = ints(x)
    assert (
        levels(TF.adjust_brightness(pil, factor), G.adjust_brightness(x, one(factor)) / 255).max() < 1e-3
    )  # integers: 0 levels
    assert (
        levels(TF.adjust_contrast(pil, factor), G.adjust_contrast(x, one(factor)) / 255).max() < 1e-3
    )  # integers: 0 levels
    assert (
        levels(TF.adjust_saturation(pil, factor), G.adjust_saturation(x, one(factor)) / 255).max() < 1e-3
    )  # integers: 0 levels
    assert levels(TF.rgb_to_grayscale(pil, 3), G.to_grayscale(x) / 255).max() < 1e-3  # integers: 0 levels


@pytest.mark.parametrize("hue", [-0.1, 0.0, 0.03, 0.4])
def test_hue_is_bit_exact_with_pil(img, hue):
    pil, x = img
    shift = int(np.int32(hue * 255)) / 255
    assert (
        levels(TF.adjust_hue(pil, hue), G.adjust_hue(ints(x), one(shift)) / 255).max() < 1e-3
    )  # integers: 0 levels


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.6, 2.0])
def test_blur_is_bit_exact_with_pil(img, sigma):
    pil, x = img
    out = G.gaussian_blur(ints(x).repeat(2, 1, 1, 1), torch.tensor([sigma, 0.3]))
    assert (
        levels(pil.filter(ImageFilter.GaussianBlur(sigma)), out[:1] / 255).max() < 1e-3
    )  # integers: 0 levels
    assert levels(pil.filter(ImageFilter.GaussianBlur(0.3)), out[1:] / 255).max() < 1e-3  # integers: 0 levels
    assert G.MAX_BOX_RADIUS == 1  # sigma <= 2: five taps per pass, fixed, no host sync


def test_flip_commutes_with_every_device_op():
    """The loader flips before the device ops (the reference flips last): the same pixels either way."""
    aug = G.GPUAugment("mocov2")
    x = torch.stack([torch.from_numpy(np.array(natural_image(i, 24))).permute(2, 0, 1) for i in range(8)])
    p = aug.sample_params(8, torch.Generator().manual_seed(3))
    p["blur"][:] = True
    assert torch.equal(aug.apply_levels(x.flip(-1), p), aug.apply_levels(x, p).flip(-1))


def per_sample_reference(aug: G.GPUAugment, x: torch.Tensor, p: dict) -> torch.Tensor:
    """The recipe applied to one sample at a time, in plain sequential code (the pre-sync-free
    structure: only the selected samples are processed)."""
    outs = []
    for i in range(x.shape[0]):
        y = x[i : i + 1]
        if aug.name == "mocov1" and p["gray"][i]:
            y = G.to_grayscale(y)
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                if op == 0:
                    y = G.adjust_brightness(y, p["brightness"][i : i + 1])
                elif op == 1:
                    y = G.adjust_contrast(y, p["contrast"][i : i + 1])
                elif op == 2:
                    y = G.adjust_saturation(y, p["saturation"][i : i + 1])
                else:
                    y = G.adjust_hue(y, p["hue"][i : i + 1])
        if aug.name == "mocov2":
            if p["gray"][i]:
                y = G.to_grayscale(y)
            if p["blur"][i]:
                y = G.gaussian_blur(y, p["sigma"][i : i + 1])
        outs.append(y)
    return torch.cat(outs)


@pytest.mark.parametrize("name", ["mocov2", "mocov1"])
def test_batched_apply_equals_per_sample_application(name):
    aug = G.GPUAugment(name)
    x = torch.stack([torch.from_numpy(np.array(natural_image(i, 24))).permute(2, 0, 1) for i in range(12)])
    x = x.int()
    p = aug.sample_params(12, torch.Generator().manual_seed(1))
    assert torch.equal(aug.apply_levels(x, p), per_sample_reference(aug, x, p))
    assert len(set(p["brightness"].tolist())) == 12  # per-sample draws, not one per batch


def test_forward_is_seeded_normalised_and_keeps_memory_format():
    aug = G.build_gpu_augment(SimpleNamespace(NAME="mocov2", IMPL="gpu"), "cpu")
    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x.contiguous(memory_format=torch.channels_last), torch.Generator().manual_seed(7))
    assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-6)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(a, aug(x, torch.Generator().manual_seed(8)))
    # with every op switched off the output is the plain normalisation of the input
    p = aug.sample_params(6, torch.Generator().manual_seed(0))
    p = {k: torch.zeros_like(v) if v.dtype == torch.bool else v for k, v in p.items()}
    plain = (aug.apply(x.float() / 255, p) - aug.mean) / aug.std
    expected = TF.normalize(x.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(plain, expected)
    with pytest.raises(ValueError, match="uint8"):
        aug(x.float())


def test_fast_uint8_views_normalised_on_the_device_equal_the_cpu_views():
    """AUG.IMPL fast on CUDA ships uint8 and normalises on the device: same draws, same floats."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    on_cpu = FA.FastTwoViewTransform("mocov2", 24, mean=mean, std=std)
    shipped = FA.FastTwoViewTransform("mocov2", 24, mean=mean, std=std, uint8_output=True)
    norm = G.Normalize(mean, std)
    for i in range(6):
        img = natural_image(30 + i)
        torch.manual_seed(i), random.seed(i)  # the blur's sigma comes from Python's random
        a = on_cpu(img)
        torch.manual_seed(i), random.seed(i)
        b = shipped(img)
        for u, v in zip(a, b):
            assert v.dtype == torch.uint8 and v.shape == (3, 24, 24)
            batch = v.unsqueeze(0).contiguous(memory_format=torch.channels_last)
            out = norm(batch)
            assert out.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(out[0], u, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        norm(torch.zeros(1, 3, 4, 4))


def test_device_stage_is_chosen_by_impl_and_device():
    def aug(impl: str) -> SimpleNamespace:
        return SimpleNamespace(NAME="mocov2", IMPL=impl, SIZE=24)

    assert G.normalize_on_device(aug("fast"), "cuda") and not G.normalize_on_device(aug("fast"), "cpu")
    assert not G.normalize_on_device(aug("reference"), "cuda")
    assert not G.normalize_on_device(aug("gpu"), "cuda")  # GPUAugment normalises itself
    assert G.build_device_stage(aug("reference"), "cpu") is None
    assert G.build_device_stage(aug("fast"), "cpu") is None  # the CPU loader ships finished views
    assert isinstance(G.build_device_stage(aug("gpu"), "cpu"), G.GPUAugment)


def test_batched_apply_equals_pil_per_sample():
    """Same parameters -> the reference's PIL ops, sample by sample: the device path is bit-exact."""
    aug = G.GPUAugment("mocov2")
    imgs = [natural_image(50 + i, 24) for i in range(6)]
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs])
    p = aug.sample_params(6, torch.Generator().manual_seed(2))
    out = aug.apply_levels(x, p)
    for i, im in enumerate(imgs):
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                if op == 0:
                    im = TF.adjust_brightness(im, float(p["brightness"][i]))
                elif op == 1:
                    im = TF.adjust_contrast(im, float(p["contrast"][i]))
                elif op == 2:
                    im = TF.adjust_saturation(im, float(p["saturation"][i]))
                else:
                    im = TF.adjust_hue(im, float(p["hue"][i]) + 0.5 / 255 * np.sign(float(p["hue"][i])))
        if p["gray"][i]:
            im = TF.rgb_to_grayscale(im, 3)
        if p["blur"][i]:
            im = im.filter(ImageFilter.GaussianBlur(float(p["sigma"][i])))
        assert np.array_equal(np.asarray(im), out[i].permute(1, 2, 0).numpy()), i


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device->host sync detection needs CUDA")
def test_forward_does_not_sync_on_cuda():
    aug = G.GPUAugment("mocov2").cuda()
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    aug(x, g)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(x, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
