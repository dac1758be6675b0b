"""Augmentation throughput: images/s per CPU core, two 224² views per image, decoded from JPEG files.

Baseline = the reference recipe (PIL + torchvision exactly as the official MoCo code); ours = the fast
CPU path, and the CPU half of the device path (crop + flip only). Both start from the same JPEG files
decoded the same way (PIL, like the official ImageFolder loader). With ``--device cuda`` it also measures
the device half (``GPUAugment``) on batches of uint8 crops.

It also times the demo's scale (``configs/demo/moco_v2.yaml``: 28² views of 28² greyscale PNGs, like
Fashion-MNIST, cut here from the same photos), where per-call overhead rather than pixel work decides.

    python -m bench.bench_augment [--images 64] [--rounds 5] [--demo-images 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from bench.common import environment, make_jpegs, print_json, print_table, timed_rounds
from moco_d2.core import debian
from pretrain.augment.device import GPUAugment
from pretrain.augment.reference import TwoCropsTransform, mocov1_reference, mocov2_reference


def real_jpegs(folder: str, count: int) -> list[Path]:
    """``count`` ImageNet-sized JPEGs (longer side 500, quality 90) cut from the real photographs of
    Debian's lomiri-wallpapers packages; [] when none are installed."""
    photos = debian.photos()
    paths: list[Path] = []
    for i in range(count if photos else 0):
        with Image.open(photos[i % len(photos)]) as im:
            im.draft("RGB", (1000, 1000))
            im = im.convert("RGB")
            im.thumbnail((500, 500), Image.BILINEAR)
            if i >= len(photos):  # more files than photos: mirrored copies decode the same
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            path = Path(folder) / f"photo{i:04d}.jpg"
            im.save(path, "JPEG", quality=90)
            paths.append(path)
    return paths


def demo_pngs(folder: str, count: int, size: int = 28) -> list[Path]:
    """``count`` greyscale ``size``² PNGs like the demo's Fashion-MNIST files, cut from the real photos
    (random squares, so the views differ) or, without them, from synthetic JPEGs."""
    sources = real_jpegs(folder, min(count, 16)) or make_jpegs(folder, min(count, 16))
    rng = random.Random(0)
    paths: list[Path] = []
    for i in range(count):
        with Image.open(sources[i % len(sources)]) as im:
            side = rng.randint(size, min(im.size))
            left, top = rng.randint(0, im.size[0] - side), rng.randint(0, im.size[1] - side)
            tile = (
                im.convert("L")
                .crop((left, top, left + side, top + side))
                .resize((size, size), Image.BILINEAR)
            )
        path = Path(folder) / f"demo{i:05d}.png"
        tile.save(path)
        paths.append(path)
    return paths


def load(path: Path) -> Image.Image:
    """The official loader: PIL decode + convert("RGB")."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def loop(paths: list[Path], transform) -> int:
    for p in paths:
        transform(load(p))
    return len(paths)


def gpu_augment_rate(device: str, batch: int, size: int, repeats: int) -> float:
    """Images/s (two views each) of the device half on uint8 batches already on ``device``."""
    aug = GPUAugment("mocov2").to(device)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    aug(x, g)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        aug(x, g)
        aug(x, g)  # query and key views
    sync()
    return batch * repeats / (time.perf_counter() - start)


def timed_rounds_spread(fns, rounds: int) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """``timed_rounds`` (interleaved A B A B ...), keeping each pipeline's min and max rate too."""
    import statistics

    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, rate in timed_rounds(fns, 1).items():
            runs[name].append(rate)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return med, {k: (round(min(v), 1), round(max(v), 1)) for k, v in runs.items()}


def cpu_pipelines(images: int, rounds: int, s: int) -> tuple[list[list[object]], dict[str, object]]:
    """Per-core images/s of each CPU pipeline, interleaved rounds on the same JPEG files."""
    import cv2

    from pretrain.augment.fast import CropFlipTwoView, FastTwoViewTransform

    torch.set_num_threads(1)  # per core: one process, one thread, as one loader worker
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = real_jpegs(tmp, images)
        source = (
            f"real photos ({debian.PHOTO_DIR}, Debian {debian.PHOTO_PACKAGE})" if paths else "synthetic JPEGs"
        )
        if not paths:
            paths = make_jpegs(tmp, images)
        fns = {
            "decode only": lambda: loop(paths, lambda img: img),
            "reference mocov2": lambda: loop(paths, TwoCropsTransform(mocov2_reference(s))),
            "fast mocov2": lambda: loop(paths, FastTwoViewTransform("mocov2", s)),
            "reference mocov1": lambda: loop(paths, TwoCropsTransform(mocov1_reference(s))),
            "fast mocov1": lambda: loop(paths, FastTwoViewTransform("mocov1", s)),
            "gpu impl, CPU half": lambda: loop(paths, CropFlipTwoView(s)),
        }
        for fn in fns.values():  # warm caches and lazy imports
            fn()
        rates, spread = timed_rounds_spread(fns, rounds)
    base = rates["reference mocov2"]
    rows: list[list[object]] = [
        [name, rate, f"{spread[name][0]:.1f}-{spread[name][1]:.1f}", f"{rate / base:.2f}x"]
        for name, rate in rates.items()
    ]
    record = {
        "images_per_s_per_core": {
            k.replace(" ", "_").replace(",", ""): round(v, 1) for k, v in rates.items()
        },
        "ratio_fast_vs_reference_mocov2": round(rates["fast mocov2"] / base, 2),
        "ratio_fast_vs_reference_mocov1": round(rates["fast mocov1"] / rates["reference mocov1"], 2),
        "ratio_gpu_cpu_half_vs_reference_mocov2": round(rates["gpu impl, CPU half"] / base, 2),
        "images_per_s_min_max": {k.replace(" ", "_").replace(",", ""): v for k, v in spread.items()},
        "images": images,
        "rounds": rounds,
        "source": source,
    }
    return rows, record


def demo_pipelines(images: int, rounds: int, size: int = 28) -> tuple[list[list[object]], dict[str, object]]:
    """Per-core images/s of the reference and fast mocov2 transforms at the demo's scale, interleaved."""
    import cv2

    from pretrain.augment.fast import FastTwoViewTransform

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = demo_pngs(tmp, images, size)
        fns = {
            f"reference mocov2, {size}² PNGs": lambda: loop(paths, TwoCropsTransform(mocov2_reference(size))),
            f"fast mocov2, {size}² PNGs": lambda: loop(paths, FastTwoViewTransform("mocov2", size)),
        }
        for fn in fns.values():
            fn()
        rates, spread = timed_rounds_spread(fns, rounds)
    ref, fast = rates.values()
    rows: list[list[object]] = [
        [name, rate, f"{spread[name][0]:.1f}-{spread[name][1]:.1f}", f"{rate / ref:.2f}x"]
        for name, rate in rates.items()
    ]
    record = {
        "images_per_s_per_core": {"reference_mocov2": round(ref, 1), "fast_mocov2": round(fast, 1)},
        "ms_per_image": {"reference_mocov2": round(1e3 / ref, 3), "fast_mocov2": round(1e3 / fast, 3)},
        "images_per_s_min_max": dict(zip(("reference_mocov2", "fast_mocov2"), spread.values())),
        "ratio_fast_vs_reference_mocov2": round(fast / ref, 2),
        "images": images,
        "size": size,
    }
    return rows, record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64, help="JPEG files per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default=None, help="also time the device half on this device (e.g. cuda)")
    parser.add_argument("--gpu-batch", type=int, default=256)
    parser.add_argument("--gpu-repeats", type=int, default=20)
    parser.add_argument("--gpu-only", action="store_true", help="skip the CPU pipelines (no OpenCV needed)")
    parser.add_argument(
        "--demo-images", type=int, default=256, help="28² PNGs per round at the demo's scale (0: skip)"
    )
    args = parser.parse_args()

    rows: list[list[object]] = []
    record: dict[str, object] = {"bench": "augment", "size": args.size}
    if not args.gpu_only:
        rows, cpu_record = cpu_pipelines(args.images, args.rounds, args.size)
        record.update(cpu_record)
        if args.demo_images > 0:
            demo_rows, record["demo_28px"] = demo_pipelines(args.demo_images, args.rounds)
            rows += demo_rows
    if args.device:
        rate = gpu_augment_rate(args.device, args.gpu_batch, args.size, args.gpu_repeats)
        rows.append([f"GPUAugment on {args.device} (batch {args.gpu_batch})", rate, "-", "-"])
        record["gpu_augment_images_per_s"] = round(rate, 1)
        record["gpu_augment_device"] = args.device
    record["env"] = environment()
    s = args.size
    print(f"augmentation throughput, {s}x{s}, two views per image, images/s (CPU rows: one core, median)")
    print(f"images: {record.get('source', '-')}")
    if "demo_28px" in record:
        print("last two rows: the demo's scale, 28x28 views of 28x28 greyscale PNGs, vs the 28² reference")
    print_table(["pipeline", "images/s", "min-max", "vs reference v2"], rows)
    print_json(record)


if __name__ == "__main__":
    main()
