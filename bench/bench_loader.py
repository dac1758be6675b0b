"""Data-loader-inclusive throughput: the project's loader (``pretrain.data``) for N workers.

For each AUG.IMPL and worker count it reports images/s delivered and the fraction of step time spent
waiting for data, while a simulated accelerator step (``--step-ms``: sleep, i.e. no CPU use, as a GPU
step) runs between batches. With ``--step-ms 0`` it is the loader's raw throughput (then the wait
fraction is 1 by definition). Images: real photos (Debian's lomiri-wallpapers, cut to ~500x375 by
``bench.bench_augment.real_jpegs``), synthetic photo-like JPEGs only where none are installed.

Baseline (``reference`` row) = the official loader: ``torchvision.datasets.ImageFolder`` with the official
``TwoCropsTransform`` of aug+ (PIL), ``shuffle=True, drop_last=True``, torch's default prefetch,
``pin_memory=True`` on a GPU, the same workers. The other rows use the project's loader
(``pretrain.data``) as the trainer builds it (pinned on a GPU). Every configuration runs ``--rounds``
times, interleaved (reference, fast, gpu, reference, ...); median (min-max).

``--real-step ARCH`` replaces the simulated step by a real MoCo training step on ``--device``: the
end-to-end comparison. The reference row then runs the official step (``bench.official``), the fast/gpu
rows the trainer's (``bench.bench_step.our_mode``), and the gpu row applies ``GPUAugment`` on the device.

    python -m bench.bench_loader --workers 0 1 2 --batch 32 --steps 8 --step-ms 100
    python -m bench.bench_loader --real-step resnet50 --device cuda --workers 16 --batch 128 --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from bench.bench_augment import real_jpegs
from bench.bench_step import OFFICIAL, build, our_mode, step
from bench.common import environment, make_jpegs, print_json, print_table
from moco_d2.core.images import SafeImageFolder
from pretrain.augment import build_pretrain_transform
from pretrain.augment.device import build_device_stage, normalize_on_device
from pretrain.augment.reference import TwoCropsTransform, mocov2_reference
from pretrain.data import EpochBatchSampler, PretrainDataset


def make_device_step(aug: SimpleNamespace, args, on_device: bool):
    """A real MoCo step on ``args.device``: baseline settings for the reference impl, ours otherwise
    (with the augmentation's device half as ``pretrain.train`` runs it: GPUAugment for "gpu", the
    normalisation of the uint8 views for "fast" on CUDA).

    The returned function synchronises (reads the loss), so the time of the step is real.
    """
    device = torch.device(args.device)
    mode = OFFICIAL if aug.IMPL == "reference" else our_mode(device, args.real_step, args.size)
    model, optimizer = build(args.real_step, args.batch * 16, device, mode)
    model.train()
    device_stage = build_device_stage(aug, device) if aug.IMPL == "gpu" or on_device else None

    def device_step(batch, i: int) -> None:
        im_q, im_k = batch[0], batch[1]
        if device_stage is not None:
            g = torch.Generator().manual_seed(i)
            fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
            im_q = device_stage(im_q.to(device, non_blocking=True).contiguous(memory_format=fmt), g)
            im_k = device_stage(im_k.to(device, non_blocking=True).contiguous(memory_format=fmt), g)
        loss = step(model, optimizer, im_q, im_k, device, mode, torch.Generator().manual_seed(i))
        loss.item()

    return device_step


def warmup_batches(workers: int, args) -> int:
    """Batches consumed before timing: at least every prefetched batch plus one."""
    return args.warmup if args.warmup is not None else workers * args.prefetch + 2


def views(batch) -> list:
    """(im_q, im_k) of a batch from either loader: the official one yields ([im_q, im_k], target)."""
    return batch[0] if isinstance(batch[0], list) else batch


def photo_folder(root: str, count: int, unique: int) -> str:
    """An ImageFolder of ``count`` JPEGs (4 classes): ``unique`` real photos, the rest hard links."""
    distinct = real_jpegs(root, min(unique, count))
    if not distinct:  # no photo package installed: synthetic photo-like JPEGs
        make_jpegs(root, count, classes=4, unique=unique)
        return "synthetic"
    for i in range(count):
        sub = Path(root) / f"class{i % 4:03d}"
        sub.mkdir(exist_ok=True)
        os.link(distinct[i % len(distinct)], sub / f"img{i:05d}.jpg")
    for path in distinct:
        path.unlink()
    return "real photos (/usr/share/backgrounds)"


HOST_NORMALISED = "fast-hostnorm"  # AUG.IMPL fast with float views from the workers (before session 2)


def run(root: str, impl: str, workers: int, args) -> dict[str, float]:
    host_normalised = impl == HOST_NORMALISED
    impl = "fast" if host_normalised else impl
    aug = SimpleNamespace(NAME="mocov2", IMPL=impl, SIZE=args.size, CROP_SCALE=[0.2, 1.0])
    pin = bool(args.real_step) and args.device.startswith("cuda")  # official: pin_memory=True; trainer too
    on_device = bool(args.real_step) and normalize_on_device(aug, args.device) and not host_normalised
    if impl == "reference":  # the official main_moco.py loader
        dataset = ImageFolder(root, TwoCropsTransform(mocov2_reference(args.size)))
        loader = DataLoader(
            dataset, batch_size=args.batch, shuffle=True, num_workers=workers, pin_memory=pin, drop_last=True
        )
    else:
        images = SafeImageFolder(root)
        dataset = PretrainDataset(images, build_pretrain_transform(aug, on_device), seed=0)
        sampler = EpochBatchSampler(len(images), args.batch, rank=0, world_size=1, seed=0)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            prefetch_factor=args.prefetch if workers else None,
        )
    device_step = make_device_step(aug, args, on_device) if args.real_step else None
    it = iter(loader)
    # Worker start-up, cuDNN autotuning and the batches the workers prefetched meanwhile are not steady
    # state: consume (and step on) enough batches to empty the prefetch queue before timing.
    for i in range(warmup_batches(workers, args)):
        batch = views(next(it))
        if device_step is not None:
            device_step(batch, 10**6 + i)
    waited, start = 0.0, time.perf_counter()
    for i in range(args.steps):
        tick = time.perf_counter()
        batch = views(next(it))
        waited += time.perf_counter() - tick
        if device_step is not None:
            device_step(batch, i + 1)
        else:
            time.sleep(args.step_ms / 1000.0)
    total = time.perf_counter() - start
    del it
    return {"images_per_s": args.batch * args.steps / total, "wait_fraction": waited / total}


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--impls",
        nargs="+",
        default=["reference", "fast", "gpu"],
        choices=["reference", "fast", "gpu", HOST_NORMALISED],
        help=f"AUG.IMPL rows; {HOST_NORMALISED!r} = fast with the normalisation in the workers",
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed batches per configuration")
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated device step per batch (sleep)")
    parser.add_argument("--prefetch", type=int, default=4, help="ours (DATA.PREFETCH_FACTOR)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; median (min-max)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches (workers*prefetch+2)")
    parser.add_argument("--unique-images", type=int, default=1024, help="distinct JPEGs (rest hard links)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--real-step", default="", metavar="ARCH", help="run a real MoCo step of ARCH")
    parser.add_argument("--device", default="cpu", help="device of --real-step")
    return parser


def main() -> None:
    args = build_arg_parser().parse_args()

    torch.set_num_threads(1)
    if args.real_step and args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as main_moco.py and pretrain.train set it (both rows)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        most = max(warmup_batches(w, args) for w in args.workers) + args.steps
        source = photo_folder(tmp, args.batch * most, args.unique_images)
        for workers in args.workers:
            runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in args.impls}
            for _ in range(args.rounds):
                for impl in args.impls:
                    runs[impl].append(run(tmp, impl, workers, args))
            base = statistics.median(r["images_per_s"] for r in runs[args.impls[0]])
            for impl in args.impls:
                rates = [r["images_per_s"] for r in runs[impl]]
                med, wait = (
                    statistics.median(rates),
                    statistics.median(r["wait_fraction"] for r in runs[impl]),
                )
                rows.append(
                    [
                        workers,
                        impl,
                        f"{med:.1f} ({min(rates):.1f}-{max(rates):.1f})",
                        f"{wait:.2f}",
                        f"{med / base:.2f}x",
                    ]
                )
                results.append(
                    {
                        "workers": workers,
                        "impl": impl,
                        "images_per_s": round(med, 3),
                        "images_per_s_min_max": [round(min(rates), 3), round(max(rates), 3)],
                        "wait_fraction": round(wait, 3),
                    }
                )
    print(
        f"loader throughput: batch {args.batch}, {args.steps} batches, "
        + (
            f"real {args.real_step} MoCo step on {args.device} (reference = the official step, bench.official)"
            if args.real_step
            else f"simulated step {args.step_ms:.0f} ms (impl 'gpu' = CPU half only)"
        )
        + f", {args.size}² two views, {source}; images/s median (min-max) of {args.rounds} interleaved rounds"
    )
    print_table(["workers", "AUG.IMPL", "images/s", "data wait", "vs official"], rows)
    print_json(
        {
            "bench": "loader",
            "step_ms": args.step_ms,
            "real_step": args.real_step,
            "device": args.device,
            "batch": args.batch,
            "images": source,
            "rounds": args.rounds,
            "results": results,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
