"""Issue 18 speed rows: each of our step settings next to the official code's step, same run, same device.

Settings (the 8-GPU recipe's per-device work, and one device doing the whole global batch):

* ``b32``: batch 32 per GPU, plain BN (one GPU's share of the 8-GPU recipe): the official step vs ours
  eager vs ours + ``torch.compile`` in ``--compile-mode`` (TRAIN.COMPILE True, TRAIN.COMPILE_MODE;
  ``reduce-overhead`` = CUDA graphs, meant for exactly this launch-bound batch);
* ``split8``: one GPU, global batch 256, 8 BN splits: the official step with the official Colab demo's
  ``SplitBatchNorm`` vs ours (the vectorised ``SplitBatchNorm2d``, MODEL.BN_SPLITS 8).

Official = ``bench.official`` through ``bench.bench_step`` (``moco/builder.py`` on one process, the body of
``main_moco.py``'s loop, torch's default SGD construction, pinned memory + non-blocking copies on CUDA);
ours = ``pretrain.train.train_step`` with the trainer's defaults (``bench.bench_step.our_mode``). Rounds
are interleaved (official, ours, ... each round), median (min-max) images/s; the table prints every row.

For the compiled row the bench reports whether CUDA graphs were actually used, since a fallback to plain
kernels (e.g. forced by BatchNorm's running-stat updates, which mutate graph inputs) is silent apart from
a log line: graph launches in one profiled steady-state step, graphs recorded by inductor's cudagraph
trees (before and after timing: growth means re-recording), and inductor's cudagraph skip counter with
the reasons it logged. Off CUDA it prints "n/a".

Last, a 200-epoch ImageNet-1k wall-clock PROJECTION (not a measurement): 200 x 1,281,167 images divided by
the measured step images/s; one GPU from ``split8``, 8 GPUs as 8 x one GPU's ``b32`` rate (linear scaling
assumed); data loading, all-gather and all-reduce not included (``gpu_check.sh``'s end-to-end rows say
whether the loader keeps up).

    python -m bench.bench_issue18 --device cuda                       # ResNet-50, 224 px: what gpu_check.sh runs
    python -m bench.bench_issue18 --device cpu --arch resnet18 --image-size 32 --K 64 --split-batch 16 \\
        --steps 1 --warmup 1 --compile-backend eager                 # the CPU self-test (tests/bench)
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace

import torch

from bench.bench_step import OFFICIAL, Runner, StepMode, our_mode, time_runners
from bench.common import environment, print_json, print_table

IMAGENET_TRAIN = 1_281_167
EPOCHS = 200
PROJECTION_NOTE = (
    f"PROJECTION, not a measurement: {EPOCHS} epochs x {IMAGENET_TRAIN:,} images / measured step images/s; "
    "8 GPUs = 8 x one GPU's batch-32 rate (linear scaling assumed); no data loading, all-gather or all-reduce"
)


@dataclass(frozen=True)
class Setting:
    key: str
    title: str
    batch: int
    bn_splits: int
    modes: tuple[StepMode, ...]


def settings(args: argparse.Namespace, device: torch.device) -> dict[str, Setting]:
    """The two issue-18 settings; the first mode of each is its baseline (the official step)."""
    ours = our_mode(device, args.arch, args.image_size)
    b32 = [OFFICIAL, ours]
    if args.compile_mode:
        name = f"{ours.name} + compile {args.compile_mode}"
        if args.compile_backend != "inductor":
            name = f"{ours.name} + compile (backend {args.compile_backend})"
        b32.append(
            replace(
                ours,
                name=name,
                compile=True,
                compile_mode=args.compile_mode,
                compile_backend=args.compile_backend,
            )
        )
    return {
        "b32": Setting("b32", f"batch {args.batch} per GPU, plain BN", args.batch, 1, tuple(b32)),
        "split8": Setting(
            "split8",
            f"1 GPU, global batch {args.split_batch}, {args.splits} BN splits",
            args.split_batch,
            args.splits,
            (OFFICIAL, replace(ours, name=f"{ours.name}, vectorised split BN")),
        ),
    }


class CudagraphLog(logging.Handler):
    """Collects inductor's cudagraph messages (``skipping cudagraphs due to ...``): the reasons behind a
    fallback, which torch only logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "cudagraph" in message.lower() and message not in self.messages:
            self.messages.append(message[:300])


def cudagraph_counters() -> dict[str, int]:
    """Inductor's cudagraph counters (``cudagraph_skips`` and friends; names vary across torch versions)."""
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in counters["inductor"].items() if "cudagraph" in k}


def graphs_recorded(device: torch.device) -> int | None:
    """CUDA graphs recorded so far by inductor's cudagraph trees on ``device`` (None: not inspectable)."""
    try:
        from torch._inductor import cudagraph_trees

        index = device.index if device.index is not None else torch.cuda.current_device()
        manager = cudagraph_trees.get_manager(index, create_if_none_exists=False)
        if manager is None:
            return 0
        stack, count = [node for nodes in manager.roots.values() for node in nodes], 0
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(child for children in node.children.values() for child in children)
        return count
    except Exception:  # a private API: report "unknown" rather than fail the bench
        return None


def launches_in_one_step(runner: Runner) -> dict[str, int] | None:
    """One more (untimed) step under the profiler: CUDA graph launches vs single kernel launches."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.run(1)
        names = [event.name for event in prof.events()]
    except Exception:
        return None
    return {
        "graph_launches": sum("cudaGraphLaunch" in n for n in names),
        "kernel_launches": sum("LaunchKernel" in n for n in names),
    }


def cudagraph_verdict(report: dict[str, object]) -> str:
    """'yes' (graphs replayed, nothing skipped), 'partly' (replayed, but some graphs fell back), 'no', 'unknown'."""
    launches, recorded = report["launches_in_one_step"], report["graphs_after_timing"]
    skips = int(report["counters_delta"].get("cudagraph_skips", 0))
    replayed = launches["graph_launches"] > 0 if launches is not None else (recorded or 0) > 0
    if launches is None and recorded is None:
        return "unknown"
    if not replayed:
        return "no"
    return "yes" if skips == 0 else "partly"


def measure_setting(
    args: argparse.Namespace, device: torch.device, setting: Setting
) -> tuple[list[dict[str, object]], dict[str, object] | None]:
    """Build every mode (same weights; a mode that fails to build is reported, not fatal), time them
    interleaved, and for a compiled mode on CUDA check whether CUDA graphs were used."""
    graphs_log, inductor_log = CudagraphLog(), logging.getLogger("torch._inductor")
    inductor_log.addHandler(graphs_log)
    counters_before = cudagraph_counters()
    runners, rows = [], []
    try:
        for mode in setting.modes:
            try:
                runners.append(Runner(args, device, mode, setting.batch, setting.bn_splits))
                rows.append({"mode": mode.name})
            except Exception as exc:  # e.g. a compile or CUDA-graph capture error: keep the other rows
                rows.append({"mode": mode.name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                print(f"{setting.key}: {mode.name} FAILED to build: {rows[-1]['error']}", flush=True)
        compiled = next((r for r in runners if r.mode.compile), None)
        graphs_before = graphs_recorded(device) if compiled and device.type == "cuda" else None
        timed = iter(time_runners(runners, args.steps, args.rounds))
        for row in rows:
            if "error" not in row:
                row.update(next(timed))
                print(f"{setting.key}: {row['mode']}: {row['images_per_s']:.1f} images/s", flush=True)
        report = None
        if compiled is not None:
            report = {"mode": compiled.mode.name, "used": "n/a", "device": device.type}
            if device.type == "cuda":
                report["graphs_after_warmup"] = graphs_before
                report["graphs_after_timing"] = graphs_recorded(device)
                report["launches_in_one_step"] = launches_in_one_step(compiled)
                after = cudagraph_counters()
                report["counters_delta"] = {
                    k: v - counters_before.get(k, 0)
                    for k, v in after.items()
                    if v != counters_before.get(k, 0)
                }
                report["skip_reasons"] = graphs_log.messages
                report["used"] = cudagraph_verdict(report)
    finally:
        inductor_log.removeHandler(graphs_log)
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, report


def describe_cudagraphs(report: dict[str, object]) -> str:
    """One line: the verdict and the evidence behind it."""
    if report["used"] == "n/a":
        return f"CUDA graphs in '{report['mode']}': n/a ({report['device']})"
    launches = report["launches_in_one_step"]
    step = (
        "profiler unavailable"
        if launches is None
        else f"{launches['graph_launches']} graph launches + {launches['kernel_launches']} kernel launches "
        "in one steady step"
    )
    skips = report["counters_delta"].get("cudagraph_skips", 0)
    text = (
        f"CUDA graphs in '{report['mode']}': {report['used']} -- {step}; graphs recorded "
        f"{report['graphs_after_warmup']} after warm-up, {report['graphs_after_timing']} after timing; "
        f"inductor cudagraph skips: {skips}"
    )
    before, after = report["graphs_after_warmup"], report["graphs_after_timing"]
    if isinstance(before, int) and isinstance(after, int) and after > before:
        text += (
            f"; RE-RECORDED during timing ({after - before} new graphs: the timed rate includes recording)"
        )
    return "\n".join([text, *(f"  skip reason: {m}" for m in report["skip_reasons"])])


def hours(images_per_s: float, gpus: int = 1) -> float:
    """Projected wall-clock hours of EPOCHS ImageNet-1k epochs at ``gpus`` x the measured rate."""
    return EPOCHS * IMAGENET_TRAIN / (gpus * images_per_s) / 3600


def projection(
    results: dict[str, list[dict[str, object]]], titles: dict[str, str]
) -> list[dict[str, object]]:
    """One projected row per measured mode: 1 GPU from split8, 8 GPUs from b32 (x 8)."""
    out = []
    for key, gpus in (("split8", 1), ("b32", 8)):
        for row in results.get(key, []):
            if "images_per_s" in row:
                setting = titles[key] if gpus == 1 else f"{gpus} GPUs x ({titles[key]})"
                rate = float(row["images_per_s"])
                out.append({"setting": setting, "mode": row["mode"], "gpus": gpus,
                            "images_per_s_per_gpu": round(rate, 1), "hours": round(hours(rate, gpus), 2)})  # fmt: skip
    return out


def json_row(setting: Setting, row: dict[str, object]) -> dict[str, object]:
    """A measured mode as the JSON line reports it: rates as printed (median, min, max)."""
    out: dict[str, object] = {"batch": setting.batch, "bn_splits": setting.bn_splits, "mode": row["mode"]}
    if "error" in row:
        return {**out, "error": row["error"]}
    peak = row["peak_mem_gib"]
    return {
        **out,
        "images_per_s": [round(float(row[k]), 1) for k in ("images_per_s", "min", "max")],
        "ratio_vs_official": row["ratio_vs_official"],
        "peak_mem_gib": None if peak is None else round(float(peak), 2),
        "first_loss": round(float(row["first_loss"]), 5),
    }


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", default="resnet50", help="a torchvision ResNet (the official code builds it)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--K", type=int, default=65536, help="queue length, a multiple of both batches")
    p.add_argument("--rows", nargs="+", default=["split8", "b32"], choices=["b32", "split8"],
                   help="settings, measured in this order (split8 first: no compile, so it is never lost)")  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="per-GPU batch of b32")
    p.add_argument("--split-batch", type=int, default=256, help="global batch of split8")
    p.add_argument("--splits", type=int, default=8, help="BN splits of split8 (MODEL.BN_SPLITS)")
    p.add_argument(
        "--compile-mode", default="reduce-overhead", help="TRAIN.COMPILE_MODE of b32's third row; '' = none"
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="'eager': dynamo without inductor (CPU self-test)"
    )
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3); median (min-max)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed steps per mode (compile, CUDA-graph recording)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave the default)")
    return p


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = build_arg_parser()
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be >= 3 (median of interleaved rounds)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # main_moco.py and pretrain.train both set it
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (
        f"issue 18 step throughput: {args.arch}, {args.image_size}², K={args.K}, {name}, images/s median "
        f"(min-max) of {args.rounds} interleaved rounds x {args.steps} steps, {args.warmup} warm-up steps"
    )
    print(header, flush=True)
    all_settings = settings(args, device)
    results: dict[str, list[dict[str, object]]] = {}
    graphs: dict[str, object] | None = None
    for key in args.rows:
        results[key], report = measure_setting(args, device, all_settings[key])
        graphs = report or graphs

    print("\n" + header)
    table = []
    for key, rows in results.items():
        s = all_settings[key]
        base = rows[0].get("images_per_s")
        for row in rows:
            if "error" in row:
                table.append([key, s.batch, s.bn_splits, row["mode"], "FAILED", "-", "-", "-"])
                continue
            rate, lo, hi = (float(row[k]) for k in ("images_per_s", "min", "max"))
            row["ratio_vs_official"] = round(rate / base, 3) if base else None
            peak = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"
            ratio = f"{rate / base:.2f}x" if base else "-"
            table.append([key, s.batch, s.bn_splits, row["mode"], f"{rate:.1f} ({lo:.1f}-{hi:.1f})", ratio,
                          peak, f"{row['first_loss']:.4f}"])  # fmt: skip
    print_table(
        ["row", "batch", "BN splits", "mode", "images/s", "vs official", "peak GiB", "first loss"], table
    )
    if graphs is not None:
        print(describe_cudagraphs(graphs))
    titles = {k: s.title for k, s in all_settings.items()}
    proj = projection(results, titles)
    print(f"\n{EPOCHS}-epoch ImageNet-1k wall clock -- {PROJECTION_NOTE}:")
    print_table(
        ["setting", "mode", "images/s per GPU", "projected hours"],
        [[r["setting"], r["mode"], f"{r['images_per_s_per_gpu']:.1f}", f"{r['hours']:.1f}"] for r in proj],
    )
    out: dict[str, object] = {
        "bench": "issue18",
        "device": name,
        "arch": args.arch,
        "image_size": args.image_size,
        "K": args.K,
        "rounds": args.rounds,
        "steps": args.steps,
        "official": OFFICIAL.name,
        "results": {key: [json_row(all_settings[key], row) for row in rows] for key, rows in results.items()},
        "cuda_graphs": graphs,
        "projection_200ep": {"note": PROJECTION_NOTE, "rows": proj},
        "env": environment(),
    }
    print_json(out)
    return out


if __name__ == "__main__":
    main()
