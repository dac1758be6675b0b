"""Wall clock of a short real CPU pretraining run (``python -m pretrain.train``) under thread environments.

Each run is a fresh process, as a user starts it, on an ImageFolder of Fashion-MNIST images (Debian's
package, ``demo.fashion_mnist``); the default is the demo's scale (``configs/demo/moco_v2.yaml``:
resnet18_small, 28 px, 8 BN splits, 1 loader worker), one epoch, no kNN monitor, no checkpoint, eager
(``TRAIN.COMPILE False``: the compile's ~60 s would hide the steps). Environments:

* ``plain shell, before``: no OpenMP variables and torch imported before the project, i.e. the
  runtime's default (threads spin while they wait), what every entry point did before issue 17;
* ``plain shell, ours``: no OpenMP variables: the policy of ``moco_d2.core.threads``;
* ``tuned: PASSIVE, N threads``: ``OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=N`` set by hand.

Every environment runs on a quiet machine and with ``--busy`` extra processes spinning
(``python -c 'while True: pass'``), interleaved (one run of each per repetition), ``--reps`` times;
the median wall time with min-max, and ours / best hand-tuned.

    python -m bench.bench_threads --reps 3
    python -m bench.bench_threads --arch resnet50 --size 224 --images 64 --batch 32 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_json, print_table

ROOT = Path(__file__).resolve().parent.parent
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
BEFORE = (
    "import runpy, sys, torch; sys.argv = ['pretrain.train'] + sys.argv[1:]; "
    "runpy.run_module('pretrain.train', run_name='__main__', alter_sys=True)"
)


def write_images(root: Path, count: int) -> None:
    from demo.data import write_imagefolder
    from demo.fashion_mnist import load_split

    images, labels = load_split("train")
    write_imagefolder(root, "train", "img", images[:count], labels[:count])


def environments(cores: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (python arguments before the trainer's, extra environment)."""
    envs = {
        "plain shell, before": (["-c", BEFORE], {}),
        "plain shell, ours": (["-m", "pretrain.train"], {}),
    }
    for n in sorted({cores, max(1, cores - 1)}, reverse=True):
        envs[f"tuned: PASSIVE, {n} thread(s)"] = (
            ["-m", "pretrain.train"],
            {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(n)},
        )
    return envs


def run_once(prefix: list[str], extra: dict[str, str], opts: list[str], out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env.update(extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, *prefix, *opts, "OUTPUT_DIR", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo/moco_v2.yaml")
    parser.add_argument("--arch", default=None, help="MODEL.ARCH (default: the config's)")
    parser.add_argument("--size", type=int, default=None, help="AUG.SIZE (default: the config's)")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--bn-splits", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="extra spinning processes")
    parser.add_argument("--only", nargs="*", default=None, help="environment names to run (default all)")
    args = parser.parse_args()

    if not (args.arch and args.size):
        from moco_d2.core.config import load_config, pretrain_defaults

        cfg = load_config(pretrain_defaults(), args.config)
        args.arch, args.size = args.arch or cfg.MODEL.ARCH, args.size or int(cfg.AUG.SIZE)
    cores = os.cpu_count() or 1
    envs = environments(cores)
    if args.only:
        envs = {k: v for k, v in envs.items() if k in args.only}
    opts = [
        "--config-file", args.config, "MODEL.ARCH", args.arch, "AUG.SIZE", str(args.size), "TRAIN.COMPILE", "False",
        "SOLVER.BATCH_SIZE", str(args.batch), "MODEL.K", str(args.K), "MODEL.BN_SPLITS", str(args.bn_splits),
        "DATA.NUM_WORKERS", str(args.workers), "SOLVER.EPOCHS", "1", "KNN.EVAL_PERIOD", "0",
        "CHECKPOINT.PERIOD_ITERS", "0", "RESUME", "", "TRAIN.DEVICE", "cpu", "LOG.TENSORBOARD", "False",
    ]  # fmt: skip
    times: dict[tuple[int, str], list[float]] = {(b, e): [] for b in args.busy for e in envs}
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp) / "data", args.images)
        opts += ["DATA.ROOT", str(Path(tmp) / "data")]
        for rep in range(args.reps):
            for busy in args.busy:
                spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
                try:
                    for name, (prefix, extra) in envs.items():
                        out = Path(tmp) / f"out{rep}_{busy}_{list(envs).index(name)}"
                        times[(busy, name)].append(run_once(prefix, extra, opts, out))
                finally:
                    for p in spinners:
                        p.kill()
                        p.wait()
    print(
        f"thread environments: python -m pretrain.train, {args.arch} {args.size} px, BN splits {args.bn_splits}, "
        f"{args.workers} loader worker(s), {args.images} images x 1 epoch (batch {args.batch}), {cores} cores; "
        f"wall seconds, median (min-max) of {args.reps} interleaved runs"
    )
    rows, results = [], []
    for busy in args.busy:
        med = {e: statistics.median(times[(busy, e)]) for e in envs}
        tuned = [e for e in envs if e.startswith("tuned")]
        best = min(tuned, key=med.get) if tuned else None
        for e in envs:
            t = times[(busy, e)]
            vs = f"{med[best] / med[e]:.2f}x" if best else "-"
            rows.append([busy, e, f"{med[e]:.1f} ({min(t):.1f}-{max(t):.1f})", vs])
            results.append(
                {"busy": busy, "env": e, "median_s": round(med[e], 2), "runs_s": [round(x, 2) for x in t]}
            )
    print_table(["busy procs", "environment", "seconds", "speed vs best tuned"], rows)
    print_json(
        {"bench": "threads", "arch": args.arch, "size": args.size, "images": args.images, "results": results}
    )


if __name__ == "__main__":
    main()
