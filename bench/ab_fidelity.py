"""Issue 14 A/B miniature: do our default deviations from the official run move kNN accuracy?

Runs the demo pretraining (ResNet-18, 32 px, Fashion-MNIST ImageFolder from ``python -m demo.data
--quick``; ``configs/demo/quick/moco_v2.yaml``) with the same seed and the same short schedule in four
settings, then the kNN protocol on the final query encoder:

* ``default``            -- AUG.IMPL fast + bf16 autocast (TRAIN.AMP True), seed 0
* ``default seed 1``     -- the same with seed 1: the seed-to-seed spread the differences are read against
* ``TRAIN.AMP False``    -- fp32 everywhere, seed 0
* ``AUG.IMPL reference`` -- the official PIL pipeline, seed 0

CPU emulation of the GPU's AMP: ``pretrain.train`` only autocasts on CUDA, so this script makes
``TRAIN.AMP True`` mean bf16 CPU autocast (the dtype an H100/H200 gets); without AMX that is slower, hence
the tiny schedule. A miniature: it can show a gross effect, not a fraction-of-a-point one.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m bench.ab_fidelity [--epochs 2] [--root datasets/demo-quick]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import pretrain.train as train_mod
from moco_d2.core.config import load_config
from moco_d2.core.distributed import DistInfo
from moco_d2.core.io import load_checkpoint

CONFIG = "configs/demo/quick/moco_v2.yaml"
VARIANTS = [  # name, overrides
    ("default", ["SEED", "0"]),
    ("default seed 1", ["SEED", "1"]),
    ("TRAIN.AMP False", ["SEED", "0", "TRAIN.AMP", "False"]),
    ("AUG.IMPL reference", ["SEED", "0", "AUG.IMPL", "reference"]),
]


def cpu_amp_dtype(cfg, device):
    """TRAIN.AMP on the CPU: bf16 autocast, as on a bf16 GPU (the trainer itself autocasts on CUDA only)."""
    return torch.bfloat16 if cfg.TRAIN.AMP else None


def run_variant(root: Path, work: Path, overrides: list[str], epochs: int, batch: int) -> dict:
    imgs = root / "imagefolder"
    opts = [
        "DATA.ROOT", str(imgs), "DATA.NUM_WORKERS", "0", "DATA.PREFETCH_FACTOR", "2",
        "KNN.TRAIN_ROOT", str(imgs / "train"), "KNN.VAL_ROOT", str(imgs / "val"), "KNN.EVAL_PERIOD", "0",
        "SOLVER.EPOCHS", str(epochs), "SOLVER.BATCH_SIZE", str(batch), "RESUME", "",
        "LOG.PERIOD", "1000", "OUTPUT_DIR", str(work), "TRAIN.DEVICE", "cpu", *overrides,
    ]  # fmt: skip
    cfg = load_config(train_mod.pretrain_defaults(), CONFIG, opts)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    start = time.perf_counter()
    result = train_mod.train(cfg, info)
    seconds = time.perf_counter() - start
    moco = train_mod.build_model(cfg, 1)
    state = load_checkpoint(work / "model_final.pth")["state_dict"]
    moco.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    knn = train_mod.KnnMonitor(cfg, torch.device("cpu"))(moco)
    return {"loss": result["loss"], "top1": knn["top1"], "top5": knn["top5"], "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--root", type=Path, default=Path("datasets/demo-quick"), help="python -m demo.data --quick"
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args(argv)
    if not (args.root / "imagefolder" / "train").is_dir():
        raise SystemExit(f"{args.root}/imagefolder missing: run `python -m demo.data --quick` first")
    train_mod.amp_dtype_for = cpu_amp_dtype
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(VARIANTS):
            rows[name] = run_variant(args.root, Path(tmp) / str(i), overrides, args.epochs, args.batch)
            print(f"{name}: {rows[name]}", flush=True)
    base = rows["default"]["top1"]
    spread = abs(rows["default seed 1"]["top1"] - base)
    print(f"\nA/B miniature: resnet18, 32 px, {args.root}, {args.epochs} epochs x batch {args.batch}, CPU")
    print(f"{'setting':>20}  {'final loss':>10}  {'kNN top-1':>9}  {'vs default':>10}  {'seconds':>7}")
    for name, r in rows.items():
        print(
            f"{name:>20}  {r['loss']:10.4f}  {r['top1']:9.2f}  {r['top1'] - base:+10.2f}  {r['seconds']:7.0f}"
        )
    print(f"seed-to-seed spread (|seed 1 - seed 0| kNN top-1): {spread:.2f}")
    out = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "epochs": args.epochs,
        "batch": args.batch,
        "top1": {k: round(v["top1"], 2) for k, v in rows.items()},
        "seed_spread": round(spread, 2),
    }
    print("JSON:", json.dumps(out))
    return out


if __name__ == "__main__":
    main()
