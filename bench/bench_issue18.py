"""Issue 18 speed rows, each next to its same-run baseline (interleaved rounds, median images/s):

* ``b32``: batch 32 per GPU (the 8-GPU recipe's per-device work): official fp32 NCHW + per-parameter SGD
  baseline, ours eager (bf16 on CUDA + channels_last + fused SGD), ours + torch.compile(--compile-mode);
* ``split8``: one GPU, global batch 256, MODEL.BN_SPLITS 8: baseline = the same fp32 step with split BN
  as a Python loop over the 8 groups (what emulating 8 GPUs cost before), ours = vectorised split BN +
  our step defaults;

then a 200-epoch wall-clock PROJECTION (ImageNet-1k, 1,281,167 images) from the measured step img/s:
1 GPU from ``split8``, 8 GPUs as 8 x the per-GPU ``b32`` rate (linear scaling assumed, data loading and
all-reduce not included -- the end-to-end loader rows of gpu_check.sh say whether the input keeps up).

    python -m bench.bench_issue18 --device cuda [--rows b32 split8] [--compile-mode reduce-overhead]
Runs on the CPU too (small --arch/--image-size/--K), for checking the script itself. Ends with a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pretrain.moco import MoCo, SplitBatchNorm2d

IMAGENET_TRAIN = 1_281_167


@dataclass(frozen=True)
class Mode:
    name: str
    ours: bool  # bf16 (CUDA) + channels_last + fused/foreach SGD; else fp32 NCHW per-parameter SGD
    compile_mode: str = ""  # "" = eager
    loop_split_bn: bool = False


def loop_split_bn_forward(self: SplitBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """SplitBatchNorm2d before vectorisation: one F.batch_norm per group (the emulation's old cost)."""
    if not self.training or self.num_splits == 1:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
    s = self.num_splits
    self.num_batches_tracked.add_(1)
    means = self.running_mean.unsqueeze(0).repeat(s, 1)
    variances = self.running_var.unsqueeze(0).repeat(s, 1)
    outs = [
        F.batch_norm(c, means[i], variances[i], self.weight, self.bias, True, self.momentum, self.eps)
        for i, c in enumerate(x.chunk(s))
    ]
    self.running_mean.copy_(means.mean(0))
    self.running_var.copy_(variances.mean(0))
    return torch.cat(outs)


class Runner:
    def __init__(self, args, device: torch.device, mode: Mode, batch: int, splits: int) -> None:
        torch.manual_seed(0)
        self.model = MoCo(args.arch, 128, args.K, 0.999, 0.2, True, bn_splits=splits).to(device)
        if mode.loop_split_bn:
            for m in self.model.modules():
                if isinstance(m, SplitBatchNorm2d):
                    m.forward = loop_split_bn_forward.__get__(m)
        fmt = torch.channels_last if mode.ours else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)
        if mode.compile_mode:
            self.model.compile_encoders(mode=mode.compile_mode)
        fast = (
            ({"fused": True} if device.type == "cuda" else {"foreach": True})
            if mode.ours
            else {"foreach": False}
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4, **fast)
        amp = mode.ours and device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
        g = torch.Generator().manual_seed(1)
        size = args.image_size
        self.views = [
            torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt) for _ in range(2)
        ]
        self.device, self.batch, self.gen = device, batch, torch.Generator().manual_seed(2)

    def step(self) -> torch.Tensor:
        with self.autocast:
            logits, labels = self.model(*self.views, self.gen)
            loss = F.cross_entropy(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def timed(self, steps: int) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        loss.item()
        sync()
        return self.batch * steps / (time.perf_counter() - start)


def measure(args, device, modes: list[Mode], batch: int, splits: int) -> dict[str, float]:
    runners = {m.name: Runner(args, device, m, batch, splits) for m in modes}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    rates = {name: [] for name in runners}
    for _ in range(args.rounds):  # interleaved: background load hits every mode alike
        for name, r in runners.items():
            rates[name].append(r.timed(args.steps))
    return {name: statistics.median(v) for name, v in rates.items()}


def hours(img_per_s: float, epochs: int = 200) -> float:
    return epochs * IMAGENET_TRAIN / img_per_s / 3600


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--K", type=int, default=65536)
    p.add_argument("--rows", nargs="+", default=["b32", "split8"], choices=["b32", "split8"])
    p.add_argument("--compile-mode", default="reduce-overhead", help="'' for no compiled row")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--split-batch", type=int, default=256, help="global batch of the split8 row")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(
        f"issue 18 speed rows: {args.arch}, {args.image_size}², K={args.K}, {args.rounds}x{args.steps} steps, {device}"
    )
    print(f"{'row':>7}  {'mode':>44}  {'images/s':>9}  {'vs baseline':>11}")
    result: dict[str, dict[str, float]] = {}
    if "b32" in args.rows:
        modes = [Mode("baseline: fp32 NCHW loop SGD", False), Mode("ours eager", True)]
        if args.compile_mode:
            modes.append(Mode(f"ours + compile {args.compile_mode}", True, args.compile_mode))
        result["b32"] = measure(args, device, modes, 32, 1)
    if "split8" in args.rows:
        modes = [
            Mode("baseline: fp32 NCHW loop SGD, loop split BN", False, loop_split_bn=True),
            Mode("ours", True),
        ]
        result["split8"] = measure(args, device, modes, args.split_batch, 8)
    for row, rates in result.items():
        base = next(iter(rates.values()))
        for name, rate in rates.items():
            print(f"{row:>7}  {name:>44}  {rate:9.1f}  {rate / base:10.2f}x")
    print(
        "\n200-epoch ImageNet-1k wall clock, PROJECTION from the step rates above (no loader, linear scaling):"
    )
    proj = {}
    if "split8" in result:
        base, ours = result["split8"].values()
        proj["1 GPU, batch 256, 8 BN splits"] = (hours(base), hours(ours))
    if "b32" in result:
        rates = list(result["b32"].values())
        proj["8 GPUs x batch 32"] = (hours(8 * rates[0]), hours(8 * max(rates[1:])))
    for name, (b, o) in proj.items():
        print(f"  {name:>30}: baseline {b:7.1f} h   ours {o:7.1f} h   (projection)")
    out = {"device": str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"), "img_per_s": result,
           "projected_hours_200ep": proj}  # fmt: skip
    print("JSON:", json.dumps(out))
    return out


if __name__ == "__main__":
    main()
