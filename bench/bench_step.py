"""Full MoCo pretraining-step throughput (images/s): the official code's step against the trainer's.

Same initial weights (same seed, same construction order), same batch; each step moves the two views
from host memory to the device, runs forward + InfoNCE loss + backward + SGD, as training does.

* baseline = the official code (``bench.official``): ``moco/builder.py``'s MoCo on one process, the
  body of ``main_moco.py``'s loop, its optimizer construction (torch's SGD defaults), pinned memory and
  non-blocking copies on CUDA as its loader and loop do, and for split BN the official Colab demo's
  ``SplitBatchNorm`` with the same number of splits;
* ours = ``pretrain.train.train_step`` with the trainer's own choices (``build_model``,
  ``build_optimizer``, ``amp_dtype_for``, ``channels_last_for``): on CUDA bf16 autocast, channels_last,
  fused SGD, pinned + non_blocking; on the CPU foreach SGD, NCHW, and bf16 autocast only where
  ``moco_d2.core.cpu`` says it wins (native bf16 CPU, stock ResNet, crop >= 112 px), else fp32.
  ``--bf16`` / ``--channels-last`` add CPU rows with that choice flipped, to measure the rule.

Rows per batch size and per ``--bn-splits`` (1 = plain BN vs plain BN; 8 = split BN vs split BN, as
``MODEL.BN_SPLITS`` in one process). Timed rounds are interleaved (A B A B ...); median (min-max).

    python -m bench.bench_step --device cuda --arch resnet50 --batch-sizes 32 64 128
    python -m bench.bench_step --device cpu --arch resnet18 --image-size 32 --batch-sizes 256 --K 4096
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from bench.common import environment, print_json, print_table
from bench.official import OfficialMoCo, official_optimizer, official_step
from pretrain.moco import MoCo
from pretrain.train import train_step


@dataclass(frozen=True)
class StepMode:
    """How a step is executed; none of these options changes what is computed (up to precision)."""

    name: str
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    optimizer_impl: str = "loop"  # "loop" | "foreach" | "fused"
    pinned_non_blocking: bool = False
    compile: bool = False  # torch.compile both encoders (TRAIN.COMPILE)
    compile_mode: str = "default"  # TRAIN.COMPILE_MODE ("reduce-overhead": CUDA graphs)
    compile_backend: str = "inductor"  # "eager": dynamo only (CPU self-tests, no code generation)
    official: bool = False  # the official code's model and loop (bench.official) instead of ours


# The project's MoCo with plain fp32 settings: the reference arithmetic of tests/bench/test_augment_step.py.
BASELINE = StepMode("fp32 NCHW, SGD per-parameter loop")
OFFICIAL = StepMode(
    "official: moco/builder.py + main_moco.py loop, SGD defaults", pinned_non_blocking=True, official=True
)


def our_mode(device: torch.device, arch: str = "resnet50", size: int = 224) -> StepMode:
    """The trainer's step settings for ``device`` and this shape (``pretrain/train.py`` with its default
    TRAIN.AMP, TRAIN.CHANNELS_LAST and SOLVER.FOREACH; on the CPU ``moco_d2.core.cpu`` decides bf16)."""
    from moco_d2.core.config import pretrain_defaults
    from pretrain.train import amp_dtype_for, channels_last_for

    cfg = pretrain_defaults()
    cfg.MODEL.ARCH, cfg.AUG.SIZE = arch, size
    amp, channels_last = amp_dtype_for(cfg, device), channels_last_for(cfg, device)
    if device.type == "cuda":
        return StepMode("ours: bf16 + channels_last + fused SGD", amp, channels_last, "fused", True)
    precision = "bf16 autocast" if amp == torch.bfloat16 else "fp32"
    name = f"ours: {precision} + foreach SGD" + (" + channels_last" if channels_last else "")
    return StepMode(name, amp, channels_last, "foreach", False)


def cpu_variants(ours: StepMode, bf16: bool, channels_last: bool) -> list[StepMode]:
    """Rows that flip the trainer's CPU choices (to measure them): bf16 autocast on/off, NCHW/NHWC."""
    flips = []
    if bf16:
        amp = None if ours.amp_dtype else torch.bfloat16
        flips.append(
            replace(ours, name=f"{ours.name}, bf16 {'off' if ours.amp_dtype else 'on'}", amp_dtype=amp)
        )
    if channels_last:
        flips.append(
            replace(
                ours,
                name=f"{ours.name}, channels_last {'off' if ours.channels_last else 'on'}",
                channels_last=not ours.channels_last,
            )
        )
    if bf16 and channels_last:
        flips.append(
            replace(
                ours,
                name=f"{ours.name}, both flipped",
                amp_dtype=flips[0].amp_dtype,
                channels_last=not ours.channels_last,
            )
        )
    return flips


def build(arch: str, K: int, device: torch.device, mode: StepMode, seed: int = 0, bn_splits: int = 1):
    torch.manual_seed(seed)
    model = MoCo(arch=arch, dim=128, K=K, m=0.999, T=0.2, mlp=True, bn_splits=bn_splits).to(device)
    if mode.official:  # the same initial weights and queue (same state-dict names), the official module
        official = OfficialMoCo(arch, dim=128, K=K, m=0.999, T=0.2, mlp=True, bn_splits=bn_splits).to(device)
        official.load_state_dict(model.state_dict())
        return official, official_optimizer(official)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if mode.compile:
        if mode.compile_backend == "inductor":
            model.compile_encoders(mode=mode.compile_mode)
        else:  # other backends take no inductor mode
            model.compile_encoders(backend=mode.compile_backend)
    flags = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[
        mode.optimizer_impl
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, **flags)
    return model, optimizer


def step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    device: torch.device,
    mode: StepMode,
    generator: torch.Generator,
) -> torch.Tensor:
    """One training step from host tensors: the copy to the device, then ``pretrain.train.train_step``
    itself (the trainer's step: forward, loss, top-k, finiteness check, update); returns the loss.
    For the official mode, ``main_moco.py``'s loop body instead (the permutation from the global RNG)."""
    if mode.official:
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        return torch.tensor(official_step(model, optimizer, [im_q, im_k], device))
    fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
    im_q = im_q.to(device, non_blocking=mode.pinned_non_blocking).contiguous(memory_format=fmt)
    im_k = im_k.to(device, non_blocking=mode.pinned_non_blocking).contiguous(memory_format=fmt)
    return train_step(model, optimizer, im_q, im_k, generator, amp_dtype=mode.amp_dtype)[0]


class Runner:
    """One mode's model, optimizer and host batch; ``warmup`` reports the peak device memory it needs."""

    def __init__(self, args, device: torch.device, mode: StepMode, batch: int, bn_splits: int = 1) -> None:
        self.device, self.mode, self.batch = device, mode, batch
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model, self.optimizer = build(args.arch, args.K, device, mode, bn_splits=bn_splits)
        self.model.train()
        shape = (batch, 3, args.image_size, args.image_size)
        self.views = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        if mode.pinned_non_blocking and device.type == "cuda":
            self.views = [v.pin_memory() for v in self.views]
        self.steps_done = 0
        self.first_loss = float(self.run(1))  # same weights and inputs: equal across modes up to precision
        self.run(max(args.warmup - 1, 0))
        self.peak_gib = (
            (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else None
        )

    def run(self, steps: int) -> torch.Tensor:
        """``steps`` training steps (each with its own seeded shuffle-BN permutation); the last loss."""
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            g = torch.Generator().manual_seed(self.steps_done)
            loss = step(self.model, self.optimizer, *self.views, self.device, self.mode, g)
            self.steps_done += 1
        self.sync()
        return loss


def time_runners(runners: list[Runner], steps: int, rounds: int) -> list[dict[str, object]]:
    """Interleaved timing (A B A B ...): background load affects every mode alike. Each round is
    ``steps`` steps ending in a device synchronisation (``Runner.run``); median (min-max) images/s."""
    rates: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for r, rs in zip(runners, rates):
            start = time.perf_counter()
            r.run(steps)
            rs.append(r.batch * steps / (time.perf_counter() - start))
    return [
        {
            "images_per_s": statistics.median(rs),
            "min": min(rs),
            "max": max(rs),
            "peak_mem_gib": r.peak_gib,
            "first_loss": r.first_loss,
        }
        for r, rs in zip(runners, rates)
    ]


def measure(
    args, device: torch.device, modes: list[StepMode], batch: int, bn_splits: int
) -> list[dict[str, object]]:
    """Every mode's runner built first (same weights), then :func:`time_runners`."""
    runners = [Runner(args, device, mode, batch, bn_splits) for mode in modes]
    out = time_runners(runners, args.steps, args.rounds)
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def bn_name(bn_splits: int) -> str:
    return "plain BN" if bn_splits == 1 else f"split BN x{bn_splits}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--K", type=int, default=65536, help="queue length (a multiple of every batch size)")
    parser.add_argument(
        "--bn-splits", type=int, nargs="+", default=[1, 8], help="BN groups per process (MODEL.BN_SPLITS)"
    )
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds; median (min-max)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave the default)")
    parser.add_argument(
        "--compile", action="store_true", help="add a row: our defaults + torch.compile (TRAIN.COMPILE)"
    )
    parser.add_argument("--bf16", action="store_true", help="CPU: add a row with bf16 autocast flipped")
    parser.add_argument(
        "--channels-last", action="store_true", help="CPU: add a row with channels_last flipped"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ours = our_mode(device, args.arch, args.image_size)
    modes = [OFFICIAL, ours]
    if args.compile:
        modes.append(replace(ours, name=ours.name + " + torch.compile", compile=True))
    if device.type == "cpu":
        modes += cpu_variants(ours, args.bf16, args.channels_last)
    rows, results = [], []
    for batch in args.batch_sizes:
        for splits in args.bn_splits:
            measured = measure(args, device, modes, batch, splits)
            base = measured[0]
            for mode, r in zip(modes, measured):
                peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
                rate = f"{r['images_per_s']:.1f} ({r['min']:.1f}-{r['max']:.1f})"
                rows.append([batch, bn_name(splits), mode.name, rate, peak, f"{r['first_loss']:.4f}"])
            for mode, r in zip(modes[1:], measured[1:]):
                ratio = r["images_per_s"] / base["images_per_s"]
                label = "ratio " + mode.name.removeprefix("ours: ").join(["ours (", ")"]) + " / official"
                rows.append([batch, bn_name(splits), label, f"{ratio:.2f}x", "", ""])
                results.append(
                    {
                        "batch": batch,
                        "bn_splits": splits,
                        "mode": mode.name,
                        "ratio": round(ratio, 3),
                        "official_images_per_s": [round(base[k], 1) for k in ("images_per_s", "min", "max")],
                        "ours_images_per_s": [round(r[k], 1) for k in ("images_per_s", "min", "max")],
                        "official_peak_mem_gib": base["peak_mem_gib"] and round(base["peak_mem_gib"], 2),
                        "ours_peak_mem_gib": r["peak_mem_gib"] and round(r["peak_mem_gib"], 2),
                        "official_first_loss": round(base["first_loss"], 5),
                        "ours_first_loss": round(r["first_loss"], 5),
                    }
                )
    print(
        f"MoCo step throughput: {args.arch}, {args.image_size}², K={args.K}, {device}, "
        f"{torch.get_num_threads() if device.type == 'cpu' else ''} threads, images/s median (min-max) of "
        f"{args.rounds} interleaved rounds x {args.steps} steps"
    )
    print_table(["batch", "BN", "mode", "images/s", "peak GiB", "first loss"], rows)
    print_json(
        {
            "bench": "step",
            "device": str(device),
            "arch": args.arch,
            "image_size": args.image_size,
            "ours": ours.name,
            "official": OFFICIAL.name,
            "results": results,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
