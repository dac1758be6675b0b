"""Full MoCo pretraining-step throughput (images/s): fp32 NCHW baseline against our defaults.

Same model (``pretrain.moco.MoCo``), same initial weights, same batch; each step moves the two
views from host memory to the device, runs forward + InfoNCE loss + backward + SGD, as training does.

* baseline: fp32, NCHW, ``torch.optim.SGD`` with its per-parameter loop (foreach=False), blocking copies
  from pageable memory;
* ours on CUDA: bf16 autocast, channels_last, fused SGD, pinned memory + non_blocking copies;
* ours on CPU: fp32 (bf16 autocast is slower without AMX), foreach SGD, channels_last (oneDNN's
  NHWC kernels: ~1.4x for ResNet-50, neutral for ResNet-18; ``--cpu-nchw`` turns it off).

    python -m bench.bench_step --device cuda --arch resnet50 --batch-sizes 32 64 128
    python -m bench.bench_step --device cpu --arch resnet18 --image-size 64 --batch-sizes 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from bench.common import environment, print_json, print_table
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


BASELINE = StepMode("fp32 NCHW baseline")


def our_mode(device: torch.device, cpu_channels_last: bool = True) -> StepMode:
    """Our defaults for ``device`` (what ``pretrain/train.py`` uses with TRAIN.AMP / CHANNELS_LAST / FOREACH)."""
    if device.type == "cuda":
        return StepMode("ours: bf16 + channels_last + fused SGD", torch.bfloat16, True, "fused", True)
    name = "ours: fp32 + foreach SGD" + (" + channels_last" if cpu_channels_last else "")
    return StepMode(name, None, cpu_channels_last, "foreach", False)


def build(arch: str, K: int, device: torch.device, mode: StepMode, seed: int = 0):
    torch.manual_seed(seed)
    model = MoCo(arch=arch, dim=128, K=K, m=0.999, T=0.2, mlp=True).to(device)
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if mode.compile:
        model.compile_encoders()
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
    itself (the trainer's step: forward, loss, top-k, finiteness check, update); returns the loss."""
    fmt = torch.channels_last if mode.channels_last else torch.contiguous_format
    im_q = im_q.to(device, non_blocking=mode.pinned_non_blocking).contiguous(memory_format=fmt)
    im_k = im_k.to(device, non_blocking=mode.pinned_non_blocking).contiguous(memory_format=fmt)
    return train_step(model, optimizer, im_q, im_k, generator, amp_dtype=mode.amp_dtype)[0]


class Runner:
    """One mode's model, optimizer and host batch; ``warmup`` reports the peak device memory it needs."""

    def __init__(self, args, device: torch.device, mode: StepMode, batch: int) -> None:
        self.device, self.mode, self.batch = device, mode, batch
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.model, self.optimizer = build(args.arch, args.K, device, mode)
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


def measure(args, device: torch.device, modes: list[StepMode], batch: int) -> list[dict[str, object]]:
    """Interleaved timing (A B A B ...): background load affects both modes alike; median per round."""
    runners = [Runner(args, device, mode, batch) for mode in modes]
    rounds = {r.mode.name: [] for r in runners}
    for _ in range(args.rounds):
        for r in runners:
            start = time.perf_counter()
            r.run(args.steps)
            rounds[r.mode.name].append(batch * args.steps / (time.perf_counter() - start))
    out = [
        {
            "images_per_s": statistics.median(rounds[r.mode.name]),
            "peak_mem_gib": r.peak_gib,
            "first_loss": r.first_loss,
        }
        for r in runners
    ]
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--K", type=int, default=65536, help="queue length (a multiple of every batch size)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved timed rounds; the median is reported"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave the default)")
    parser.add_argument("--cpu-nchw", action="store_true", help="no channels_last in 'ours' on CPU")
    parser.add_argument(
        "--compile", action="store_true", help="add a row: our defaults + torch.compile (TRAIN.COMPILE)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ours = our_mode(device, cpu_channels_last=not args.cpu_nchw)
    modes = [BASELINE, ours]
    if args.compile:
        modes.append(replace(ours, name=ours.name + " + torch.compile", compile=True))
    rows, results = [], []
    for batch in args.batch_sizes:
        measured = measure(args, device, modes, batch)
        base = measured[0]
        for mode, r in zip(modes, measured):
            peak = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
            rows.append([batch, mode.name, r["images_per_s"], peak, f"{r['first_loss']:.4f}"])
        fast = measured[1]
        ratio = fast["images_per_s"] / base["images_per_s"]
        rows.append([batch, "ratio ours / baseline", f"{ratio:.2f}x", "", ""])
        entry = {
            "batch": batch,
            "baseline_images_per_s": round(base["images_per_s"], 1),
            "ours_images_per_s": round(fast["images_per_s"], 1),
            "ratio": round(ratio, 3),
            "baseline_peak_mem_gib": base["peak_mem_gib"] and round(base["peak_mem_gib"], 2),
            "ours_peak_mem_gib": fast["peak_mem_gib"] and round(fast["peak_mem_gib"], 2),
            "baseline_first_loss": round(base["first_loss"], 5),
            "ours_first_loss": round(fast["first_loss"], 5),
        }
        if args.compile:
            comp = measured[2]
            ratio_c = comp["images_per_s"] / base["images_per_s"]
            rows.append([batch, "ratio ours + compile / baseline", f"{ratio_c:.2f}x", "", ""])
            entry.update(
                compiled_images_per_s=round(comp["images_per_s"], 1),
                compiled_ratio=round(ratio_c, 3),
                compiled_peak_mem_gib=comp["peak_mem_gib"] and round(comp["peak_mem_gib"], 2),
                compiled_first_loss=round(comp["first_loss"], 5),
            )
        results.append(entry)
    print(
        f"MoCo step throughput: {args.arch}, {args.image_size}², K={args.K}, {args.rounds}x{args.steps} timed steps per mode, {device}"
    )
    print_table(["batch", "mode", "images/s", "peak GiB", "first loss"], rows)
    print_json(
        {
            "bench": "step",
            "device": str(device),
            "arch": args.arch,
            "image_size": args.image_size,
            "ours": ours.name,
            "results": results,
            "env": environment(),
        }
    )


if __name__ == "__main__":
    main()
