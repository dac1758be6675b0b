"""Data-loader-inclusive throughput: the project's loader (``pretrain.data``) for N workers.

For each AUG.IMPL and worker count it reports images/s delivered and the fraction of step time spent
waiting for data, while a simulated accelerator step (``--step-ms``: sleep, i.e. no CPU use, as a GPU
step) runs between batches. Baseline = the reference augmentation with the same loader and workers.
With ``--step-ms 0`` it is the loader's raw throughput (then the wait fraction is 1 by definition).

    python -m bench.bench_loader --workers 0 1 2 --batch 32 --steps 8 --step-ms 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from bench.common import environment, make_jpegs, print_json, print_table
from pretrain.augment import build_pretrain_transform
from pretrain.data import EpochBatchSampler, PretrainDataset, SafeImageFolder


def run(root: str, impl: str, workers: int, args) -> dict[str, float]:
    aug = SimpleNamespace(NAME="mocov2", IMPL=impl, SIZE=args.size, CROP_SCALE=[0.2, 1.0])
    images = SafeImageFolder(root)
    dataset = PretrainDataset(images, build_pretrain_transform(aug), seed=0)
    sampler = EpochBatchSampler(len(images), args.batch, rank=0, world_size=1, seed=0)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        prefetch_factor=args.prefetch if workers else None,
    )
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not steady state
    waited, start = 0.0, time.perf_counter()
    for _ in range(args.steps):
        tick = time.perf_counter()
        next(it)
        waited += time.perf_counter() - tick
        time.sleep(args.step_ms / 1000.0)
    total = time.perf_counter() - start
    del it
    return {"images_per_s": args.batch * args.steps / total, "wait_fraction": waited / total}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--impls", nargs="+", default=["reference", "fast", "gpu"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed batches per configuration")
    parser.add_argument("--step-ms", type=float, default=0.0, help="simulated device step per batch (sleep)")
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    torch.set_num_threads(1)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(tmp, args.batch * (args.steps + 1), classes=4)
        for workers in args.workers:
            base = None
            for impl in args.impls:
                r = run(tmp, impl, workers, args)
                base = base or r["images_per_s"]
                ratio = r["images_per_s"] / base
                rows.append([workers, impl, r["images_per_s"], f"{r['wait_fraction']:.2f}", f"{ratio:.2f}x"])
                results.append({"workers": workers, "impl": impl, **{k: round(v, 3) for k, v in r.items()}})
    print(
        f"loader throughput: batch {args.batch}, {args.steps} batches, simulated step {args.step_ms:.0f} ms, "
        f"{args.size}² two views (impl 'gpu' = CPU half only)"
    )
    print_table(["workers", "AUG.IMPL", "images/s", "data wait", "vs reference"], rows)
    print_json(
        {
            "bench": "loader",
            "step_ms": args.step_ms,
            "batch": args.batch,
            "results": results,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
