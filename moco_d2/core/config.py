"""Configs as data: fvcore/yacs ``CfgNode`` defaults, YAML files with ``_BASE_``, ``KEY VALUE`` overrides.

The defaults below are MoCo v2, ResNet-50, 200 epochs, exactly as the official recipe; every YAML under
``configs/pretrain/`` only states what differs from them.
"""

from __future__ import annotations

import argparse
import os

import yaml
from fvcore.common.config import CfgNode

from moco_d2.core.errors import UserError
from moco_d2.core.images import IMAGENET_MEAN, IMAGENET_STD


def run_defaults(output_dir: str) -> CfgNode:
    """The keys every training loop (pretraining, linear classification) starts from, in one place."""
    c = CfgNode()
    c.OUTPUT_DIR = output_dir
    c.SEED = 0
    # "" = start fresh, "auto" = newest valid checkpoint in OUTPUT_DIR, otherwise a checkpoint path.
    c.RESUME = ""
    c.MODEL = CfgNode()
    c.MODEL.ARCH = "resnet50"  # any torchvision ResNet constructor name
    return c


def pretrain_defaults() -> CfgNode:
    """The MoCo v2 (200 epochs, 8 GPUs, global batch 256) defaults tree."""
    c = run_defaults("output/pretrain")
    c.MODEL.DIM = 128  # feature dimension of the contrastive embedding
    c.MODEL.K = 65536  # queue size (number of negatives)
    c.MODEL.M = 0.999  # key-encoder momentum
    c.MODEL.T = 0.2  # softmax temperature (0.07 for v1)
    c.MODEL.MLP = True  # v2 projection head
    # Emulated devices for Shuffle-BN in a single process (split BN). Ignored when world size > 1.
    c.MODEL.BN_SPLITS = 8

    c.DATA = CfgNode()
    c.DATA.ROOT = "datasets/imagenet"  # ImageFolder root holding train/ (and val/ for evaluation)
    c.DATA.TRAIN_SPLIT = "train"
    c.DATA.NUM_WORKERS = 8  # loader workers per process
    c.DATA.PIN_MEMORY = True
    c.DATA.PERSISTENT_WORKERS = True
    c.DATA.PREFETCH_FACTOR = 4
    c.DATA.MAX_BAD_FRACTION = 0.001  # stop when more than this fraction of images is unreadable
    c.DATA.GRAYSCALE_TO_RGB = True  # grayscale images are replicated to 3 channels

    c.AUG = CfgNode()
    c.AUG.NAME = "mocov2"  # "mocov2" (aug+) or "mocov1"
    c.AUG.IMPL = "reference"  # "reference" (PIL + torchvision), "fast" (CPU uint8), "gpu" (on device)
    c.AUG.SIZE = 224
    c.AUG.CROP_SCALE = [0.2, 1.0]
    # GaussianBlur sigma range in pixels (aug+ only), SimCLR's for 224 px; scale it with AUG.SIZE for
    # small images (SimCLR drops the blur on 32 px CIFAR altogether).
    c.AUG.BLUR_SIGMA = [0.1, 2.0]
    c.AUG.MEAN = list(IMAGENET_MEAN)
    c.AUG.STD = list(IMAGENET_STD)

    c.SOLVER = CfgNode()
    c.SOLVER.EPOCHS = 200
    c.SOLVER.BATCH_SIZE = 256  # global batch over all processes
    c.SOLVER.BASE_LR = 0.03  # for a global batch of REFERENCE_BATCH; scaled linearly
    c.SOLVER.REFERENCE_BATCH = 256
    c.SOLVER.MOMENTUM = 0.9
    c.SOLVER.WEIGHT_DECAY = 1e-4
    c.SOLVER.SCHEDULE = "cosine"  # "cosine" (v2) or "step" (v1)
    c.SOLVER.STEPS = [120, 160]  # epochs where the step schedule multiplies lr by 0.1
    c.SOLVER.FOREACH = True  # multi-tensor optimizer kernels (fused on CUDA when available)

    c.TRAIN = CfgNode()
    # mixed precision: CUDA bf16 where supported, else fp16 + GradScaler; CPU bf16 only with native bf16
    # (AVX512_BF16 / AMX) on the shapes where it measured faster (moco_d2/core/cpu.py), else fp32
    c.TRAIN.AMP = True
    c.TRAIN.CHANNELS_LAST = True  # NHWC on CUDA; the CPU follows moco_d2/core/cpu.py (NCHW today)
    c.TRAIN.COMPILE = False  # torch.compile the two encoders (fuses BN/ReLU; compiles for a minute or two)
    # torch.compile mode: "default", "reduce-overhead" (CUDA graphs: less launch overhead at small per-GPU
    # batches), "max-autotune", "max-autotune-no-cudagraphs"
    c.TRAIN.COMPILE_MODE = "default"
    c.TRAIN.MAX_ITERS = 0  # stop after this many iterations (0 = run all epochs); simulates a kill
    c.TRAIN.DEVICE = "auto"  # "auto", "cuda" or "cpu"

    c.CHECKPOINT = CfgNode()
    c.CHECKPOINT.PERIOD_ITERS = 0  # also checkpoint every N iterations inside an epoch (0 = off)
    c.CHECKPOINT.KEEP_LAST = 3

    c.LOG = CfgNode()
    c.LOG.PERIOD = 20  # iterations between log lines / metric writes
    c.LOG.TENSORBOARD = True

    c.KNN = CfgNode()
    c.KNN.EVAL_PERIOD = 0  # epochs between kNN evaluations during pretraining (0 = off)
    c.KNN.TRAIN_ROOT = ""  # labelled ImageFolder used as the kNN memory bank
    c.KNN.VAL_ROOT = ""  # labelled ImageFolder used as queries
    c.KNN.K = 200
    c.KNN.T = 0.07
    c.KNN.RESIZE = 256
    c.KNN.CROP_SIZE = 224
    c.KNN.BATCH_SIZE = 256
    return c


def load_config(defaults: CfgNode, config_file: str | None, opts: list[str] | None = None) -> CfgNode:
    """Merge a YAML file (with ``_BASE_`` chains) and ``KEY VALUE`` overrides onto ``defaults``.

    Every user mistake (missing file, bad YAML, unknown key, odd override list) is a one-line UserError.
    """
    cfg = defaults.clone()
    cfg.set_new_allowed(False)
    if config_file:
        if not os.path.isfile(config_file):
            raise UserError(f"config file {config_file!r} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            problem = getattr(exc, "problem", None) or "parse error"
            raise UserError(f"config file {config_file!r} is not valid YAML{line}: {problem}") from None
        except KeyError as exc:
            raise UserError(f"config file {config_file!r}: unknown key {_key_name(exc)}") from None
        except (AssertionError, ValueError, TypeError) as exc:
            raise UserError(f"config file {config_file!r}: {_explain(exc)}") from None
    opts = list(opts or [])
    if len(opts) % 2:
        raise UserError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    try:
        cfg.merge_from_list(opts)
    except KeyError as exc:
        raise UserError(f"config override: unknown key {_key_name(exc)}") from None
    except (AssertionError, ValueError, TypeError) as exc:
        raise UserError(f"config override: {_explain(exc)}") from None
    cfg.freeze()
    return cfg


def _explain(exc: Exception) -> str:
    msg = " ".join(str(exc).split())
    if "Non-existent" in msg:
        return f"unknown key {_key_name(exc)}"
    return msg


def _key_name(exc: Exception) -> str:
    msg = str(exc.args[0]) if exc.args else str(exc)
    for prefix in ("Non-existent config key: ", "Non-existent key: "):
        msg = msg.replace(prefix, "")
    return msg


def default_argument_parser(description: str) -> argparse.ArgumentParser:
    """``--config-file FILE`` plus trailing ``KEY VALUE`` overrides, as in Detectron2's tools."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config-file", default=None, metavar="FILE", help="YAML config (may use _BASE_)")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[], help="config overrides as KEY VALUE pairs"
    )
    return parser
