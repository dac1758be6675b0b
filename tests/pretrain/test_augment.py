"""Reference recipes and the fast CPU path: same random draws, same pixels within stated tolerances."""

from __future__ import annotations

import io
import random
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision import transforms

from moco_d2.core import debian
from moco_d2.core.errors import UserError
from moco_d2.core.images import build_eval_transform, build_lincls_train_transform
from pretrain.augment import build_pretrain_transform
from pretrain.augment import fast as FA
from pretrain.augment.reference import GaussianBlur, TwoCropsTransform, mocov1_reference, mocov2_reference

LEVEL = 1.0 / 255.0


def natural_image(seed: int, width: int = 120, height: int = 90) -> Image.Image:
    """A smooth colour field plus texture, JPEG round-tripped: closer to photos than white noise."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    arr = np.asarray(base).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def cfg(**kw) -> SimpleNamespace:
    base = {"NAME": "mocov2", "IMPL": "reference", "SIZE": 32, "CROP_SCALE": [0.2, 1.0]}
    base.update(kw)
    return SimpleNamespace(**base)


def levels(a, b) -> np.ndarray:
    """|a - b| in 8-bit levels for two HxWx3 images (PIL or arrays, uint8 or float in [0, 255])."""
    return np.abs(np.asarray(a).astype(np.float64) - np.asarray(b).astype(np.float64))


# ---------------------------------------------------------------- reference recipes and builders


def test_reference_recipes_match_official_op_order():
    v2 = [type(t).__name__ for t in mocov2_reference().transforms]
    assert v2 == [
        "RandomResizedCrop",
        "RandomApply",
        "RandomGrayscale",
        "RandomApply",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    jitter = mocov2_reference().transforms[1]
    assert jitter.p == 0.8 and tuple(jitter.transforms[0].hue) == (-0.1, 0.1)
    assert tuple(jitter.transforms[0].brightness) == (0.6, 1.4)
    assert isinstance(mocov2_reference().transforms[3].transforms[0], GaussianBlur)
    v1 = [type(t).__name__ for t in mocov1_reference().transforms]
    assert v1 == [
        "RandomResizedCrop",
        "RandomGrayscale",
        "ColorJitter",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    assert tuple(mocov1_reference().transforms[2].hue) == (-0.4, 0.4)


def test_gaussian_blur_draws_sigma_from_python_random():
    img = natural_image(0)
    random.seed(3)
    out = GaussianBlur()(img)
    random.seed(3)
    sigma = random.uniform(0.1, 2.0)
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma))))


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("name", ["mocov2", "mocov1"])
def test_builder_returns_two_normalised_views(name, impl):
    t = build_pretrain_transform(cfg(NAME=name, IMPL=impl))
    q, k = t(natural_image(1))
    assert q.shape == k.shape == (3, 32, 32) and q.dtype == torch.float32
    assert not torch.equal(q, k)  # two independent draws


def test_builder_gpu_impl_returns_uint8_crops():
    q, k = build_pretrain_transform(cfg(IMPL="gpu"))(natural_image(2))
    assert q.shape == k.shape == (3, 32, 32) and q.dtype == torch.uint8


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"NAME": "simclr"}, "AUG.NAME"),
        ({"IMPL": "tpu"}, "AUG.IMPL"),
        ({"CROP_SCALE": [0.5, 0.2]}, "AUG.CROP_SCALE"),
    ],
)
def test_builder_rejects_bad_config(bad, key):
    with pytest.raises(UserError, match=key):
        build_pretrain_transform(cfg(**bad))


def test_eval_and_lincls_transforms():
    img = natural_image(3)
    x = build_eval_transform(24, 28)(img)
    assert x.shape == (3, 24, 24)
    ref = TF.normalize(
        TF.to_tensor(TF.center_crop(TF.resize(img, 28), 24)), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    )
    assert torch.equal(x, ref)
    assert build_lincls_train_transform(16)(img).shape == (3, 16, 16)


# ---------------------------------------------------------------- fast path: each op on fixed parameters


def real_photo(size: int = 224) -> Image.Image | None:
    """A real photograph (Debian ``lomiri-wallpapers-*``), downscaled to ImageNet size; None if absent."""
    photos = debian.photos()
    if not photos:
        return None
    with Image.open(photos[len(photos) // 2]) as im:
        im.draft("RGB", (size * 2, size * 2))
        return im.convert("RGB").resize((size, size), Image.BILINEAR)


@pytest.fixture(scope="module", params=["synthetic", "photo"])
def crop(request) -> tuple[Image.Image, np.ndarray]:
    if request.param == "photo":
        img = real_photo(160)
        if img is None:
            pytest.skip(f"no real photos under {debian.PHOTO_DIR} (apt-get install {debian.PHOTO_PACKAGE})")
    else:
        img = natural_image(4, 96, 96)
    return img, np.array(img)


def report(name: str, d: np.ndarray) -> tuple[float, float]:
    """Max and 99.9th percentile |difference| in levels, printed (pytest -s shows them)."""
    mx, p999 = float(d.max()), float(np.quantile(d, 0.999))
    print(f"{name}: max {mx:.0f} p99.9 {p999:.0f} levels")
    return mx, p999


def test_fast_resized_crop_within_one_level_of_pil(crop):
    """torch's uint8 antialiased bilinear is Pillow's two-pass algorithm with 15-bit instead of 22-bit
    weights: each intermediate may round the other way, so this one op is within 1, not exact."""
    img, arr = crop
    src = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)
    n = arr.shape[0]
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(n // 5, n + 1, 2))
        top, left = int(rng.integers(0, n - h + 1)), int(rng.integers(0, n - w + 1))
        ref = TF.resized_crop(img, top, left, h, w, [32, 32])
        diffs.append(levels(ref, FA.resized_crop(src, top, left, h, w, 32)).ravel())
    mx, _ = report("resize", np.concatenate(diffs))
    assert mx <= 1


@pytest.mark.parametrize("factor", [0.6, 0.87, 1.13, 1.4])
def test_fast_brightness_contrast_saturation_are_bit_exact(crop, factor):
    img, arr = crop
    assert levels(TF.adjust_brightness(img, factor), FA.adjust_brightness(arr, factor)).max() == 0
    assert levels(TF.adjust_contrast(img, factor), FA.adjust_contrast(arr, factor)).max() == 0
    assert levels(TF.adjust_saturation(img, factor), FA.adjust_saturation(arr, factor)).max() == 0


def test_fast_grayscale_is_bit_exact(crop):
    img, arr = crop
    assert levels(TF.rgb_to_grayscale(img, 3), FA.to_grayscale(arr)).max() == 0
    assert np.array_equal(np.asarray(img.convert("L")), FA.luma(arr))


@pytest.mark.parametrize("hue", [-0.5, -0.1, -0.02, 0.0, 0.004, 0.05, 0.1, 0.4, 0.5])
def test_fast_hue_is_bit_exact(crop, hue):
    img, arr = crop
    assert levels(TF.adjust_hue(img, hue), FA.adjust_hue(arr, hue)).max() == 0


def test_pillow_hsv_round_trip_is_reproduced_on_a_million_colours():
    """Both directions of Pillow's 8-bit HSV conversion (Convert.c), checked on 2^20 colours/triples
    including every grey and every hue value (the full 2^24 sweep was run once when writing it)."""
    from pretrain.augment import device as G

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    rgb[0, :256] = np.arange(256, dtype=np.uint8)[:, None]  # greys
    rgb[1, :256, 0] = np.arange(256)  # all hues at full value / saturation
    rgb[1, :256, 1:] = [255, 0]
    t = torch.from_numpy(rgb).int()
    h, s, v = G.pil_rgb_to_hsv(t[..., 0], t[..., 1], t[..., 2])
    assert np.array_equal(torch.stack((h, s, v), -1).numpy(), np.asarray(Image.fromarray(rgb).convert("HSV")))
    back = G.pil_hsv_to_rgb(t[..., 0], t[..., 1], t[..., 2])
    pil = np.asarray(Image.frombytes("HSV", (1024, 1024), rgb.tobytes()).convert("RGB"))
    assert np.array_equal(torch.stack(back, -1).numpy(), pil)


def test_fast_hsv_tables_and_luma_are_pillow_on_a_million_colours():
    """The fast path's table-driven HSV conversions (and its float32 luma) against Pillow on the same
    2^20 colours/triples; HSV -> RGB on all 2^24 below, RGB -> HSV's full sweep was run once when
    writing it."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    rgb[0, :256] = np.arange(256, dtype=np.uint8)[:, None]  # greys
    rgb[1, :256, 0] = np.arange(256)  # all hues at full value / saturation
    rgb[1, :256, 1:] = [255, 0]
    rgb[2, :256] = [255, 255, 0]  # every hue channel value on the HSV -> RGB side
    rgb[2, :256, 0] = np.arange(256)
    assert np.array_equal(np.stack(FA.rgb_to_hsv(rgb), -1), np.asarray(Image.fromarray(rgb).convert("HSV")))
    planes = [np.ascontiguousarray(rgb[..., c]) for c in range(3)]
    pil = np.asarray(Image.frombytes("HSV", (1024, 1024), rgb.tobytes()).convert("RGB"))
    assert np.array_equal(FA.hsv_to_rgb(*planes), pil)
    assert np.array_equal(FA.luma(rgb), np.asarray(Image.fromarray(rgb).convert("L")))


def test_fast_hsv_to_rgb_is_pillow_on_every_triple():
    """The 24-bit fixed-point HSV -> RGB (``_rgb_scale_table``) against Pillow on all 2^24 (h, s, v),
    in 16 slices of 2^20 (~1 s): its exactness rests on the distance of every ``v K / 255`` from a
    half-integer, so no sample would do."""
    low = np.arange(1 << 20, dtype=np.uint32)
    for top in range(16):
        code = low + np.uint32(top << 20)
        hsv = (
            np.stack([code >> 16, (code >> 8) & 255, code & 255], -1).astype(np.uint8).reshape(1024, 1024, 3)
        )
        pil = np.asarray(Image.frombytes("HSV", (1024, 1024), hsv.tobytes()).convert("RGB"))
        assert np.array_equal(FA.hsv_to_rgb(*(np.ascontiguousarray(hsv[..., c]) for c in range(3))), pil), top


# Fixed sigmas over the demo's scaled range (AUG.BLUR_SIGMA [0.0125, 0.25]) and the default [0.1, 2.0],
# on each of the three paths: whole radius 0 with the checked multiply-add (~97.5% of drawn sigmas
# below sqrt 2), whole radius 0 without it (round sigmas such as 0.1 give nearly rational weights, a
# box pass then lands within a few 2^-24 of a rounding tie) and whole radius 1.
MULTIPLY_ADD_SIGMAS = [0.0125, 0.0371, 0.05, 0.13, 0.1874, 0.22, 0.6217, 1.0593, 1.41]
BLUR_SIGMAS = [*MULTIPLY_ADD_SIGMAS, 0.1, 0.25, 0.3, 0.45, 0.9, 1.0, 1.3, 1.5, 1.77, 2.0]


def blur_path(sigma: float) -> str:
    whole, _, fw = FA.pil_box_weights(sigma)
    if whole:
        return "column filter, radius >= 1"
    return "column filter, radius 0" if FA._unit_box_factor(fw) is None else "multiply-add"


def test_blur_sigmas_cover_every_path():
    assert [blur_path(s) for s in MULTIPLY_ADD_SIGMAS] == ["multiply-add"] * len(MULTIPLY_ADD_SIGMAS)
    paths = [blur_path(s) for s in BLUR_SIGMAS[len(MULTIPLY_ADD_SIGMAS) :]]
    assert paths == ["column filter, radius 0"] * 7 + ["column filter, radius >= 1"] * 3
    rng = np.random.default_rng(0)  # sigmas as drawn: the multiply-add takes nearly all below sqrt 2
    drawn = [blur_path(s) for s in rng.uniform(0.0125, 1.41, 2000)]
    assert drawn.count("multiply-add") > 0.95 * len(drawn)


@pytest.mark.parametrize("sigma", BLUR_SIGMAS)
def test_fast_blur_is_bit_exact(crop, sigma):
    img, arr = crop
    assert levels(img.filter(ImageFilter.GaussianBlur(sigma)), FA.gaussian_blur(arr, sigma)).max() == 0


def blur_edge_cases() -> list[np.ndarray]:
    """Images smaller than the kernel, one pixel wide or high, saturated and maximal-contrast ones."""
    rng = np.random.default_rng(3)
    cases = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(1, 1), (1, 6), (6, 1), (2, 3), (3, 200), (200, 3)]
    ]
    cases.append(np.full((7, 9, 3), 255, dtype=np.uint8))  # the largest sums: no overflow
    board = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)
    cases.append(np.repeat(board[..., None], 3, axis=2))  # every second difference is +-510
    cases.append(np.where(rng.random((20, 30, 3)) < 0.5, 0, 255).astype(np.uint8))
    return cases


@pytest.mark.parametrize("sigma", [0.0125, 0.13, 0.6217, 0.25, 1.0, 1.77, 5.0])
def test_fast_blur_is_bit_exact_on_edge_cases(sigma):
    for arr in blur_edge_cases():
        want = np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(sigma)))
        assert np.array_equal(FA.gaussian_blur(arr, sigma), want), (sigma, arr.shape)


def test_fast_blur_of_one_channel_equals_the_three_channel_blur(crop):
    """A greyscale view is blurred as one channel (``FastTwoViewTransform``): the same levels."""
    _, arr = crop
    for sigma in (0.05, 0.3, 1.9):
        one = FA.gaussian_blur(FA.to_grayscale(arr, channels=1), sigma)
        assert one.shape == (*arr.shape[:2], 1)
        assert np.array_equal(np.repeat(one, 3, axis=2), FA.gaussian_blur(FA.to_grayscale(arr), sigma))


def test_fast_blur_multiply_add_is_the_box_pass_for_every_level_and_difference():
    """Where ``_unit_box_factor`` accepts a sigma, OpenCV's float32 ``x + c D`` rounds to Pillow's pass
    ``x + ((fw D + 2^23 - eps x) >> 24)`` for all 256 x 1021 (x, D), whatever the array's shape (SIMD
    tails); where it refuses, the check matters: at sigma 1.0 that rounding is wrong for some pairs."""
    x, d = np.meshgrid(np.arange(256), np.arange(-510, 511), indexing="ij")
    rng = np.random.default_rng(0)
    accepted = 0
    for sigma in [*MULTIPLY_ADD_SIGMAS, *rng.uniform(0.0125, 1.41, 20)]:
        whole, ww, fw = FA.pil_box_weights(float(sigma))
        factor = FA._unit_box_factor(fw)
        if factor is None:
            continue
        accepted += 1
        eps = (1 << 24) - ww - 2 * fw
        want = x + ((fw * d + (1 << 23) - eps * x) >> 24)
        for width in (1021, 255, 37):
            q, dd = (
                a.astype(np.int16).ravel()[: width * (a.size // width)].reshape(-1, width) for a in (x, d)
            )
            got = cv2.addWeighted(q, 1.0, dd, factor, 0.0, dtype=cv2.CV_16S)
            assert np.array_equal(got.ravel(), want.ravel()[: got.size]), (sigma, width)
    assert accepted >= 24
    whole, ww, fw = FA.pil_box_weights(1.0)
    assert FA._unit_box_factor(fw) is None and (1 << 24) - ww - 2 * fw == 1
    naive = cv2.addWeighted(x.astype(np.int16), 1.0, d.astype(np.int16), fw * 2.0**-24, 0.0, dtype=cv2.CV_16S)
    assert not np.array_equal(naive, x + ((fw * d + (1 << 23) - x) >> 24))


def test_fast_blur_tests_catch_a_wrong_neighbour_or_edge():
    """The images above detect the mistakes either blur path could make: far pixels one step too far,
    or rows running into each other (a wrong line length: no edge replication between rows)."""
    photo = real_photo(64)
    images = [np.array(natural_image(5, 64, 48) if photo is None else photo), *blur_edge_cases()]

    def multiply_add(arr: np.ndarray, sigma: float, mistake: str | None) -> np.ndarray:
        offset = 6 if mistake == "far pixels two away" else 3
        line = arr.size if mistake == "one line" else 3 * arr.shape[1]
        factor = FA._unit_box_factor(FA.pil_box_weights(sigma)[2])
        q = arr.astype(np.int16).ravel()
        FA._unit_box_passes(q, offset, line, factor)
        FA._unit_box_passes(q, 3 * arr.shape[1], q.size, factor)
        return q.astype(np.uint8).reshape(arr.shape)

    def column_filter(arr: np.ndarray, sigma: float, mistake: str | None) -> np.ndarray:
        whole, ww, fw = FA.pil_box_weights(sigma)
        gap = [0] * (mistake == "far pixels two away")
        kernel = np.array([fw, *gap, *[ww] * (2 * whole + 1), *gap, fw]) * 2.0**-24
        h, w, c = arr.shape
        y = FA._column_box_passes(cv2.transpose(arr).reshape(w, h * c), kernel)
        y = cv2.transpose(y.reshape(w, h, c)).reshape(h, w * c)
        return FA._column_box_passes(y, kernel).reshape(arr.shape)

    for sigma, blur, mistakes in [
        (0.13, multiply_add, ("far pixels two away", "one line")),
        (0.6217, multiply_add, ("far pixels two away", "one line")),
        (0.3, column_filter, ("far pixels two away",)),
        (1.77, column_filter, ("far pixels two away",)),
    ]:
        wants = [np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(sigma))) for a in images]
        for mistake in (None, *mistakes):
            differ = sum(not np.array_equal(blur(a, sigma, mistake), w) for a, w in zip(images, wants))
            assert (differ > 0) == (mistake is not None), (sigma, mistake, differ)


def test_fast_blur_weights_are_pillows_on_many_sigmas():
    """The scalar float32 radius / weights equal the vectorised torch transcription of BoxBlur.c
    (which the blur tests above check against Pillow's pixels) on 20k sigmas, the whole-radius
    switch at sqrt(2) included."""
    from pretrain.augment import device as G

    rng = np.random.default_rng(0)
    sigmas = np.concatenate([rng.uniform(0.1, 2.0, 20000), [0.1, 2.0, np.sqrt(2), 1.4142135, 1.4142137]])
    whole, ww, fw = G.pil_box_weights(G.pil_box_radius(torch.tensor(sigmas, dtype=torch.float32)))
    expected = list(zip(whole.tolist(), ww.tolist(), fw.tolist()))
    assert [FA.pil_box_weights(s) for s in sigmas.tolist()] == expected


@pytest.mark.parametrize("height,width", [(375, 500), (28, 28), (500, 40), (40, 500), (1, 1), (3, 200)])
def test_fast_crop_sampler_is_torchvisions(height, width):
    """Same crops and the same torch RNG state afterwards as ``RandomResizedCrop.get_params``, the
    central-crop fallback of extreme shapes included."""
    for seed in range(200):
        scale = [(0.2, 1.0), (0.08, 1.0), (0.9, 1.0)][seed % 3]
        torch.manual_seed(seed)
        ref = transforms.RandomResizedCrop.get_params(
            torch.empty(0, height, width), list(scale), [3.0 / 4.0, 4.0 / 3.0]
        )
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        assert FA.sample_crop(height, width, scale) == ref
        assert torch.equal(torch.get_rng_state(), state)


def test_fast_coin_flips_are_torchvisions(monkeypatch):
    """``torch.rand(1) < p`` and RandomApply's ``p < torch.rand(1)`` compare in float32; the fast
    draws compare the same float32 values as Python floats. Checked at and next to each threshold."""
    for p in (0.1, 0.2, 0.3, 0.5, 0.7, 0.8):
        t = np.float32(p)
        for u in (t, np.nextafter(t, np.float32(0)), np.nextafter(t, np.float32(1))):
            draw = torch.tensor([u], dtype=torch.float32)
            monkeypatch.setattr(torch, "rand", lambda *a, d=draw, **k: d.clone())
            assert FA._rand_below(p) == bool(draw < p)
            assert FA._random_apply(p) == (not bool(p < draw))


def test_fast_flip_and_normalise_are_exact(crop):
    img, arr = crop
    assert np.array_equal(np.asarray(TF.hflip(img)), FA.hflip(arr))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ref = TF.normalize(TF.to_tensor(img), mean, std)
    torch.testing.assert_close(FA.Normalize(mean, std)(arr), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- fast path end to end


def paired_views(name: str):
    """(reference views, fast views, RNG streams ended equal) for 12 images (real photos when installed,
    synthetic ones otherwise), each pair drawn from the same seeds."""
    ref = TwoCropsTransform(mocov2_reference(64) if name == "mocov2" else mocov1_reference(64))
    fast = FA.FastTwoViewTransform(name, 64)
    photo = real_photo(200)
    for i in range(12):
        img = photo if (photo is not None and i % 2) else natural_image(100 + i)
        torch.manual_seed(i)
        random.seed(i)
        a = ref(img)
        state = (torch.rand(1).item(), random.random())
        torch.manual_seed(i)
        random.seed(i)
        b = fast(img)
        yield a, b, (torch.rand(1).item(), random.random()) == state


def levels_apart(u: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """|u - v| of two normalised views, back in 8-bit levels."""
    return ((u - v).abs() * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255).numpy().ravel()


@pytest.mark.parametrize("name", ["mocov2", "mocov1"])
def test_fast_makes_the_same_draws_and_nearly_the_same_pixels(name):
    """Same seed -> same crops/factors/orders/decisions (RNG streams end in the same state) -> same views.

    Every op after the resize is bit-exact, so the only difference is the resize's (<= 1 level, on a
    few % of pixels), carried through the later ops: a contrast/saturation factor up to 1.4 scales it,
    the hue round trip can move a 1-level change in one channel by a few levels in another. Bounds:
    the mean stays far below one level; max and p99.9 are printed (pytest -s). The next test checks
    that nothing but the resize differs."""
    diffs = []
    for a, b, same_draws in paired_views(name):
        assert same_draws
        diffs += [levels_apart(u, v) for u, v in zip(a, b)]
    d = np.concatenate(diffs)
    report(f"end to end {name}", d)
    assert d.mean() < 0.3  # measured 0.05-0.07 on photos and on synthetic images


def _pil_resized_crop(src: torch.Tensor, top: int, left: int, h: int, w: int, size: int) -> np.ndarray:
    """The reference's crop + resize (torchvision on a PIL image), in the fast path's calling convention."""
    img = Image.fromarray(src[0].permute(1, 2, 0).numpy())
    return np.array(TF.resized_crop(img, top, left, h, w, [size, size]))


@pytest.mark.parametrize("name", ["mocov2", "mocov1"])
def test_fast_equals_the_reference_given_pils_resize(name, monkeypatch):
    """The end-to-end claim without a tolerance: with Pillow's resize swapped in, the fast path's views
    equal the reference's on every pixel (photos and synthetic images), so every difference measured
    above comes from the resize. Only float32 normalisation rounding is allowed (~1e-5 of a level)."""
    monkeypatch.setattr(FA, "resized_crop", _pil_resized_crop)
    for a, b, _ in paired_views(name):
        for u, v in zip(a, b):
            assert float(levels_apart(u, v).max()) < 1e-3


def test_fast_accepts_grayscale_images():
    gray = natural_image(5).convert("L")
    q, _ = FA.FastTwoViewTransform("mocov2", 16)(gray)
    assert q.shape == (3, 16, 16)


# ---------------------------------------------------------------- parameter statistics


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov distance."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    return float(np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m)))


def assert_rate(hits: int, total: int, p: float) -> None:
    """Observed frequency within 4.5 binomial standard deviations of ``p``."""
    assert abs(hits / total - p) <= 4.5 * np.sqrt(p * (1 - p) / total), (hits, total, p)


class Recorder:
    """Records the parameters a pipeline applies by wrapping the samplers and ops it calls."""

    def __init__(self, monkeypatch) -> None:
        self.log: dict[str, list] = {k: [] for k in ("crop", "jitter", "gray", "blur", "flip")}
        rrc_params = transforms.RandomResizedCrop.get_params
        cj_params = transforms.ColorJitter.get_params

        def crop_params(img, scale, ratio):
            out = rrc_params(img, scale, ratio)
            self.log["crop"].append(out)
            return out

        def jitter_params(*args):
            out = cj_params(*args)
            self.log["jitter"].append((out[0].tolist(), *out[1:]))
            return out

        monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(crop_params))
        fast_crop = FA.sample_crop  # the fast path's own copy of get_params (checked equal below)

        def fast_crop_params(height, width, scale):
            out = fast_crop(height, width, scale)
            self.log["crop"].append(out)
            return out

        monkeypatch.setattr(FA, "sample_crop", fast_crop_params)
        monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(jitter_params))

        def spy(key, fn, value=lambda *a: True):
            def wrapped(*args, **kwargs):
                self.log[key].append(value(*args))
                return fn(*args, **kwargs)

            return wrapped

        tf = transforms.transforms.F
        monkeypatch.setattr(tf, "rgb_to_grayscale", spy("gray", tf.rgb_to_grayscale))
        monkeypatch.setattr(tf, "hflip", spy("flip", tf.hflip))
        blur = ImageFilter.GaussianBlur

        def blur_filter(radius):
            self.log["blur"].append(radius)
            return blur(radius)

        monkeypatch.setattr(
            "pretrain.augment.reference.ImageFilter", SimpleNamespace(GaussianBlur=blur_filter)
        )
        monkeypatch.setattr(FA, "to_grayscale", spy("gray", FA.to_grayscale))
        monkeypatch.setattr(FA, "hflip", spy("flip", FA.hflip))
        monkeypatch.setattr(FA, "gaussian_blur", spy("blur", FA.gaussian_blur, lambda x, s: s))


def crop_stats(crops, height, width):
    scale = np.array([h * w / (height * width) for _, _, h, w in crops])
    log_ratio = np.array([np.log(w / h) for _, _, h, w in crops])
    return scale, log_ratio


def run_views(transform, n_images: int, seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    img = natural_image(7, 64, 48)
    for _ in range(n_images):
        transform(img)


def test_fast_parameter_statistics_match_reference(monkeypatch):
    """Draws are shared code, so check the applied-parameter statistics end to end (2000 views each)."""
    logs = {}
    for label, transform, seed in [
        ("ref", TwoCropsTransform(mocov2_reference(16)), 1),
        ("fast", FA.FastTwoViewTransform("mocov2", 16), 2),
    ]:
        with monkeypatch.context() as m:
            rec = Recorder(m)
            run_views(transform, 1000, seed)
            logs[label] = rec.log
    ref, fast = logs["ref"], logs["fast"]
    n = 2000
    for log in (ref, fast):
        assert len(log["crop"]) == n
        assert_rate(len(log["jitter"]), n, 0.8)
        assert_rate(len(log["gray"]), n, 0.2)
        assert_rate(len(log["blur"]), n, 0.5)
        assert_rate(len(log["flip"]), n, 0.5)
    for a, b in zip(crop_stats(ref["crop"], 48, 64), crop_stats(fast["crop"], 48, 64)):
        assert ks_statistic(a, b) < ks_critical(len(a), len(b))
    for col in (1, 2, 3, 4):
        a = [j[col] for j in ref["jitter"]]
        b = [j[col] for j in fast["jitter"]]
        assert ks_statistic(a, b) < ks_critical(len(a), len(b))
    assert ks_statistic(ref["blur"], fast["blur"]) < ks_critical(len(ref["blur"]), len(fast["blur"]))
    # the test has power: a 25% narrower brightness range would be caught
    narrow = [1 + 0.75 * (j[1] - 1) for j in fast["jitter"]]
    assert ks_statistic([j[1] for j in ref["jitter"]], narrow) > ks_critical(len(narrow), len(ref["jitter"]))


def test_gpu_parameter_statistics_match_reference(monkeypatch):
    """The device path draws its own per-sample parameters: compare them with the reference's draws."""
    from pretrain.augment.device import GPUAugment

    with monkeypatch.context() as m:
        rec = Recorder(m)
        run_views(TwoCropsTransform(mocov2_reference(16)), 1000, 3)
        ref = rec.log
    with monkeypatch.context() as m:
        rec = Recorder(m)
        run_views(FA.CropFlipTwoView(16), 1000, 4)
        gpu_crops = rec.log["crop"]
    n = 2000
    p = GPUAugment("mocov2").sample_params(n, torch.Generator().manual_seed(5))
    for a, b in zip(crop_stats(ref["crop"], 48, 64), crop_stats(gpu_crops, 48, 64)):
        assert ks_statistic(a, b) < ks_critical(len(a), len(b))
    jit = p["jitter"]
    assert_rate(int(jit.sum()), n, 0.8)
    assert_rate(int(p["gray"].sum()), n, 0.2)
    assert_rate(int(p["blur"].sum()), n, 0.5)
    for col, key in [(1, "brightness"), (2, "contrast"), (3, "saturation")]:
        a, b = [j[col] for j in ref["jitter"]], p[key][jit].numpy()
        assert ks_statistic(a, b) < ks_critical(len(a), len(b)), key
    # hue: compare the shift actually applied, in 1/255 turns (torchvision truncates hue * 255)
    a = [int(np.int32(j[4] * 255)) for j in ref["jitter"]]
    b = torch.round(p["hue"][jit] * 255).numpy()
    assert ks_statistic(a, b) < ks_critical(len(a), len(b))
    assert ks_statistic(ref["blur"], p["sigma"][p["blur"]].numpy()) < ks_critical(
        len(ref["blur"]), int(p["blur"].sum())
    )
    # op order: each of the 24 permutations equally likely, in both
    for perms in ([tuple(j[0]) for j in ref["jitter"]], [tuple(o) for o in p["order"][jit].tolist()]):
        counts = np.array([perms.count(q) for q in set(perms)])
        assert len(counts) == 24
        assert np.all(
            np.abs(counts / len(perms) - 1 / 24) <= 4.5 * np.sqrt((1 / 24) * (23 / 24) / len(perms))
        )


def test_blur_sigma_is_configurable_and_every_path_follows_it():
    """AUG.BLUR_SIGMA (the demo scales it to 28 px) reaches the reference, the fast path and the device
    path; the reference and fast paths still draw identically, and a bad range is a one-line error."""
    from types import SimpleNamespace

    from moco_d2.core.errors import UserError
    from pretrain.augment import build_pretrain_transform
    from pretrain.augment.device import GPUAugment, build_device_stage
    from pretrain.augment.reference import aug_settings

    small = (0.0125, 0.25)
    cfg = SimpleNamespace(NAME="mocov2", IMPL="reference", SIZE=32, BLUR_SIGMA=list(small))
    ref = build_pretrain_transform(cfg)
    assert ref.base_transform.transforms[3].transforms[0].sigma == small
    cfg.IMPL = "fast"
    fast = build_pretrain_transform(cfg)
    assert fast.blur_sigma == small
    img = natural_image(3)
    for seed in range(6):
        outs = []
        for t in (ref, fast):
            torch.manual_seed(seed)
            random.seed(seed)
            outs.append((t(img), torch.rand(1).item(), random.random()))
        assert outs[0][1:] == outs[1][1:]  # same draws, including the blur sigma from `random`
    cfg.IMPL = "gpu"
    stage = build_device_stage(cfg, "cpu")
    sigmas = stage.sample_params(1000, torch.Generator().manual_seed(0))["sigma"]
    assert small[0] <= sigmas.min() and sigmas.max() <= small[1]
    assert stage.max_radius == 0 and GPUAugment("mocov2").max_radius == 1
    for bad in ([0.0, 1.0], [2.0, 1.0], [1.0]):
        with pytest.raises(UserError, match="AUG.BLUR_SIGMA"):
            aug_settings(SimpleNamespace(NAME="mocov2", IMPL="fast", BLUR_SIGMA=bad))
    # the device blur with the narrower fixed tap count is still Pillow's, bit for bit
    from PIL import ImageFilter

    import pretrain.augment.device as G

    arr = np.array(natural_image(4, 24))
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).int()
    for sigma in (0.0125, 0.1, 0.2, 0.25):
        want = np.array(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(radius=sigma)))
        got = G.gaussian_blur(x, torch.tensor([sigma]), stage.max_radius)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(got.astype(np.uint8), want), sigma
