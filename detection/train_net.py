"""Fine-tune and evaluate a detector with Detectron2: the MoCo detection-transfer protocol.

    python detection/train_net.py --config-file configs/voc_c4.yaml --num-gpus 8 MODEL.WEIGHTS moco.pkl

Same flags as Detectron2's tools/train_net.py (``--resume``, ``--eval-only``, ``--num-gpus``,
``--num-machines``, ``--machine-rank``, ``--dist-url``, ``KEY VALUE`` overrides). Writes the
final numbers to ``OUTPUT_DIR/metrics.json`` and drawings to ``OUTPUT_DIR/vis/``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

# Detectron2 jit-scripts helpers at import time; new torch deprecates that with a FutureWarning per run.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

# A script, not a package module: apply the thread policy here, before torch loads OpenMP.
from moco_d2.core.threads import apply_policy

apply_policy()

import torch
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from detection.checkpoint import VerifiedCheckpointer, check_weights_path
from detection.config import load_detection_config
from detection.datasets import check_datasets, register_custom_datasets
from detection.trainer import Trainer
from moco_d2.core.errors import UserError, exit_on_user_error


def check_output_dir(path: str) -> None:
    """OUTPUT_DIR must be (or become) a directory this process can create files in."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"OUTPUT_DIR {path!r} cannot be created ({exc.strerror or exc}); expected a writable directory path"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
    except OSError as exc:
        raise UserError(
            f"OUTPUT_DIR {path!r} is not writable ({exc.strerror or exc}); expected a directory this user can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def build_config(args: argparse.Namespace, *, check_data: bool = True) -> CfgNode:
    """Resolve the config, register its custom datasets and check inputs before any heavy work.

    ``check_data`` reads every dataset split through (done once, in the launching process).
    """
    cfg = load_detection_config(args.config_file, args.opts)
    register_custom_datasets(cfg)
    check_weights_path(cfg.MODEL.WEIGHTS)
    has_run = os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if has_run and not args.resume and not args.eval_only:
        # Detectron2 would start over from MODEL.WEIGHTS and overwrite the run's model_*.pth files.
        with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")) as f:
            last = f.read().strip()
        raise UserError(
            f"OUTPUT_DIR {cfg.OUTPUT_DIR!r} already holds a training run (last checkpoint {last}); "
            "continue it with --resume, or start the new run in another OUTPUT_DIR"
        )
    resuming = args.resume and has_run
    if not cfg.MODEL.WEIGHTS and not cfg.MODEL.RANDOM_INIT and not resuming:
        raise UserError(
            "MODEL.WEIGHTS is empty: pass MODEL.WEIGHTS path/to/converted.pkl "
            "(for the from-scratch baseline use configs/voc_c4_random_init.yaml)"
        )
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available; add `MODEL.DEVICE cpu`"
        )
    if args.num_gpus > 1 and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise UserError(f"--num-gpus {args.num_gpus} needs MODEL.DEVICE cuda (got {cfg.MODEL.DEVICE!r})")
    check_datasets(cfg, train=not args.eval_only, contents=check_data)
    check_output_dir(cfg.OUTPUT_DIR)
    return cfg


def main(args: argparse.Namespace):
    """One process's work (called once per GPU by ``launch``)."""
    cfg = build_config(args, check_data=False)  # run() checked the data before launching
    default_setup(cfg, args)
    # Detectron2 sets up its own loggers only; this project's (weights report, metrics.json) join them.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detection")
    if args.eval_only:
        model = Trainer.build_model(cfg)
        VerifiedCheckpointer(
            model, cfg.OUTPUT_DIR, require_backbone=not cfg.MODEL.RANDOM_INIT
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return default_argument_parser().parse_args(argv)


@exit_on_user_error
def run(argv: list[str] | None = None):
    """Command-line entry: validate in the launching process, then train/evaluate on every GPU."""
    args = parse_args(argv)
    build_config(args)  # fail fast with one clear line, before spawning workers
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    run()
