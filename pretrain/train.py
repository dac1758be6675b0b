"""MoCo pretraining loop: ``python -m pretrain.train --config-file configs/pretrain/X.yaml [KEY VALUE ...]``.

One plain loop for every scale: one CPU process, one GPU, ``torchrun --nproc_per_node 8``, many nodes.
Every random choice is a function of (SEED, epoch, step or sample index), and every checkpoint holds
the whole training state, so ``RESUME auto`` after a kill continues exactly where the run stopped,
mid-epoch included (bit-identical on the CPU).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from moco_d2.core import cpu
from moco_d2.core import distributed as dist_utils
from moco_d2.core.backbone import check_pretrain_arch
from moco_d2.core.config import default_argument_parser, load_config, pretrain_defaults
from moco_d2.core.distributed import DistInfo
from moco_d2.core.errors import UserError, exit_on_user_error
from moco_d2.core.images import SafeImageFolder, build_eval_transform, mix_seed
from moco_d2.core.io import CheckpointManager, atomic_write, choose_resume, save_atomic
from moco_d2.core.metrics import MetricWriter, progress, setup_logging
from moco_d2.core.training import (
    load_resume_checkpoint,
    load_state_checked,
    restore_optimizer,
    set_lr,
    training_checkpoint,
)
from pretrain.augment import build_pretrain_transform
from pretrain.augment.device import build_device_stage, normalize_on_device
from pretrain.data import BadImageTracker, EpochBatchSampler, PretrainDataset
from pretrain.moco import MoCo, topk_accuracy

logger = logging.getLogger("moco")

SHUFFLE_STREAM = 3  # seeds of the shuffle-BN permutations (data.py uses 1 and 2)
GPU_AUG_STREAM = 4  # seeds of the device-side augmentation (AUG.IMPL "gpu")
CHECKPOINT_KIND = "moco"


class NonFiniteLossError(UserError):
    """The loss became NaN/inf: the run stops before the optimizer step; checkpoints stay intact."""


def bn_splits_for(cfg: CfgNode, world_size: int) -> int:
    """Batch-norm groups per process: one per process on many, MODEL.BN_SPLITS emulated devices on one."""
    return 1 if world_size > 1 else int(cfg.MODEL.BN_SPLITS)


COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile's


def check_config(cfg: CfgNode, world_size: int) -> None:
    """Reject impossible settings up front, in one line each."""
    check_pretrain_arch(cfg.MODEL.ARCH)
    batch, k = int(cfg.SOLVER.BATCH_SIZE), int(cfg.MODEL.K)
    if batch <= 0 or batch % world_size:
        raise UserError(
            f"SOLVER.BATCH_SIZE={batch} must be a positive multiple of the {world_size} processes"
        )
    if k <= 0:
        raise UserError(
            f"MODEL.K={k}: the queue needs a positive size, a multiple of SOLVER.BATCH_SIZE={batch}"
        )
    if int(cfg.MODEL.DIM) <= 0:
        raise UserError(f"MODEL.DIM must be positive, got {cfg.MODEL.DIM}")
    if k % batch:
        raise UserError(f"MODEL.K={k} must be a multiple of the global batch SOLVER.BATCH_SIZE={batch}")
    splits = bn_splits_for(cfg, world_size)
    if world_size == 1 and splits < 2:
        raise UserError(
            f"MODEL.BN_SPLITS={splits}: Shuffle-BN needs at least 2 batch-norm groups; on a single process set "
            "MODEL.BN_SPLITS to the number of devices to emulate (e.g. 8)"
        )
    local = batch // world_size
    if local % splits:
        raise UserError(f"the per-process batch {local} is not divisible by MODEL.BN_SPLITS={splits}")
    if not cfg.MODEL.T > 0 or not 0 <= cfg.MODEL.M < 1:
        raise UserError(f"need MODEL.T > 0 and 0 <= MODEL.M < 1, got T={cfg.MODEL.T}, M={cfg.MODEL.M}")
    if cfg.SOLVER.SCHEDULE not in ("cosine", "step"):
        raise UserError(f"SOLVER.SCHEDULE must be 'cosine' or 'step', got {cfg.SOLVER.SCHEDULE!r}")
    if int(cfg.SOLVER.EPOCHS) <= 0:
        raise UserError(f"SOLVER.EPOCHS must be positive, got {cfg.SOLVER.EPOCHS}")
    if int(cfg.DATA.NUM_WORKERS) < 0:
        raise UserError(
            f"DATA.NUM_WORKERS must be >= 0 (0 = load in the main process), got {cfg.DATA.NUM_WORKERS}"
        )
    if int(cfg.DATA.NUM_WORKERS) > 0 and int(cfg.DATA.PREFETCH_FACTOR) < 1:
        raise UserError(f"DATA.PREFETCH_FACTOR must be >= 1, got {cfg.DATA.PREFETCH_FACTOR}")
    if int(cfg.LOG.PERIOD) < 1:
        raise UserError(f"LOG.PERIOD must be >= 1 (iterations between log lines), got {cfg.LOG.PERIOD}")
    if int(cfg.CHECKPOINT.PERIOD_ITERS) < 0 or int(cfg.CHECKPOINT.KEEP_LAST) < 1:
        raise UserError(
            f"need CHECKPOINT.PERIOD_ITERS >= 0 and CHECKPOINT.KEEP_LAST >= 1, got "
            f"{cfg.CHECKPOINT.PERIOD_ITERS} and {cfg.CHECKPOINT.KEEP_LAST}"
        )
    if int(cfg.TRAIN.MAX_ITERS) < 0:
        raise UserError(f"TRAIN.MAX_ITERS must be >= 0 (0 = no limit), got {cfg.TRAIN.MAX_ITERS}")
    if cfg.RESUME not in ("", "auto") and not Path(cfg.RESUME).is_file():
        what = "a directory" if Path(cfg.RESUME).is_dir() else "missing"
        raise UserError(f"RESUME {cfg.RESUME!r} is {what}; expected '', 'auto' or a checkpoint file")
    if cfg.TRAIN.COMPILE_MODE not in COMPILE_MODES:
        raise UserError(
            f"TRAIN.COMPILE_MODE must be one of {', '.join(COMPILE_MODES)}, got {cfg.TRAIN.COMPILE_MODE!r}"
        )


def build_model(cfg: CfgNode, world_size: int) -> MoCo:
    m = cfg.MODEL
    return MoCo(
        arch=m.ARCH, dim=m.DIM, K=m.K, m=m.M, T=m.T, mlp=m.MLP, bn_splits=bn_splits_for(cfg, world_size)
    )


def build_optimizer(cfg: CfgNode, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD over ``model.parameters()`` like the official code (the frozen key encoder gets no gradients),
    so an official checkpoint's optimizer state loads unchanged."""
    fast = {}
    if cfg.SOLVER.FOREACH:
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(
        model.parameters(),
        lr=learning_rate(cfg, 0),
        momentum=cfg.SOLVER.MOMENTUM,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        **fast,
    )


def learning_rate(cfg: CfgNode, epoch: int) -> float:
    """lr for an epoch: BASE_LR x global batch / REFERENCE_BATCH, then the cosine or step schedule."""
    s = cfg.SOLVER
    lr = s.BASE_LR * s.BATCH_SIZE / s.REFERENCE_BATCH
    if s.SCHEDULE == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / s.EPOCHS))
    for milestone in s.STEPS:
        lr *= 0.1 if epoch >= milestone else 1.0
    return lr


def amp_dtype_for(cfg: CfgNode, device: torch.device) -> torch.dtype | None:
    """Autocast dtype under TRAIN.AMP: on CUDA bf16 where supported, fp16 (with GradScaler) otherwise;
    on the CPU bf16 only where ``moco_d2.core.cpu`` measured it faster; None = full precision."""
    if not cfg.TRAIN.AMP:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu.cpu_amp(cfg.MODEL.ARCH, int(cfg.AUG.SIZE)):
        return torch.bfloat16
    return None


def channels_last_for(cfg: CfgNode, device: torch.device) -> bool:
    """NHWC memory under TRAIN.CHANNELS_LAST: always on CUDA, on the CPU where ``moco_d2.core.cpu``
    measured it faster."""
    if not cfg.TRAIN.CHANNELS_LAST:
        return False
    if device.type == "cpu":
        return cpu.cpu_channels_last_wins(cfg.MODEL.ARCH, int(cfg.AUG.SIZE))
    return device.type == "cuda"


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    im_q: torch.Tensor,
    im_k: torch.Tensor,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One MoCo step; returns [loss, acc@1, acc@5] averaged over all processes (before the update).

    Raises :class:`NonFiniteLossError` (on every rank alike) before touching the weights if the loss
    is not finite.
    """
    autocast = torch.autocast(im_q.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    with autocast:
        logits, labels = model(im_q, im_k, generator)
        loss = nn.functional.cross_entropy(logits, labels)
    acc1, acc5 = topk_accuracy(logits.detach(), labels, ks=(1, 5))
    stats = dist_utils.all_reduce_mean(torch.stack([loss.detach().float(), acc1, acc5]))
    if not torch.isfinite(stats[0]):
        raise NonFiniteLossError(f"loss is {stats[0].item()}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return stats


def checkpoint_state(
    cfg: CfgNode,
    moco: MoCo,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    epoch_step: int,
    iteration: int,
) -> dict:
    """The official checkpoint dict (epoch, arch, state_dict with ``module.``, optimizer) plus our extras."""
    extras: dict = {"iteration": iteration, "epoch_step": epoch_step}
    if scaler is not None:
        extras["scaler"] = scaler.state_dict()
    return training_checkpoint(cfg, moco, optimizer, epoch, CHECKPOINT_KIND, **extras)


def find_resume(cfg: CfgNode) -> Path | None:
    """The checkpoint RESUME names ("" a fresh run, "auto" the newest valid one in OUTPUT_DIR)."""
    path = choose_resume(cfg.RESUME, cfg.OUTPUT_DIR)
    if path is None and cfg.RESUME == "auto" and dist_utils.is_main_process():
        logger.info("RESUME auto: no valid checkpoint in %s, starting from scratch", cfg.OUTPUT_DIR)
    return path


def load_training_state(
    path: Path,
    cfg: CfgNode,
    moco: MoCo,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    steps_per_epoch: int,
) -> tuple[int, int, int]:
    """Restore model, optimizer (and scaler); returns (epoch, epoch_step, iteration) to continue from.

    Accepts our checkpoints and the official MoCo ones (which lack the iteration extras).
    """
    name = str(path)
    ckpt = load_resume_checkpoint(path, CHECKPOINT_KIND, cfg.MODEL.ARCH, "MoCo pretraining", official=True)
    sd = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    load_state_checked(moco, sd, f"RESUME {name!r}", hint="MODEL.ARCH / MODEL.MLP / MODEL.DIM / MODEL.K")
    restore_optimizer(optimizer, ckpt, name)
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    epoch, epoch_step = int(ckpt["epoch"]), int(ckpt.get("epoch_step", 0))
    iteration = int(ckpt.get("iteration", epoch * steps_per_epoch + epoch_step))
    if epoch_step >= steps_per_epoch:  # saved after the last step of an epoch
        epoch, epoch_step = epoch + 1, 0
    logger.info(
        "resumed from %s: epoch %d, step %d of the epoch, iteration %d", name, epoch, epoch_step, iteration
    )
    return epoch, epoch_step, iteration


def build_train_data(cfg: CfgNode, info: DistInfo) -> tuple[SafeImageFolder, EpochBatchSampler, DataLoader]:
    root = Path(cfg.DATA.ROOT) / cfg.DATA.TRAIN_SPLIT
    if not root.is_dir():
        raise UserError(
            f"DATA.ROOT: no training images at {str(root)!r} (expected an ImageFolder "
            f"DATA.ROOT/{cfg.DATA.TRAIN_SPLIT}/<class>/<image>)"
        )
    images = SafeImageFolder(root, max_bad_fraction=cfg.DATA.MAX_BAD_FRACTION)
    transform = build_pretrain_transform(cfg.AUG, normalize_on_device(cfg.AUG, info.device))
    dataset = PretrainDataset(images, transform, cfg.SEED)
    sampler = EpochBatchSampler(len(images), cfg.SOLVER.BATCH_SIZE, info.rank, info.world_size, cfg.SEED)
    workers = int(cfg.DATA.NUM_WORKERS)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.DATA.PIN_MEMORY and info.device.type == "cuda",
        persistent_workers=cfg.DATA.PERSISTENT_WORKERS and workers > 0,
        prefetch_factor=cfg.DATA.PREFETCH_FACTOR if workers > 0 else None,
        worker_init_fn=dist_utils.ignore_stop_signals,
    )
    return images, sampler, loader


class KnnMonitor:
    """Weighted kNN top-1 of the query encoder's pooled features, every KNN.EVAL_PERIOD epochs."""

    def __init__(self, cfg: CfgNode, device: torch.device) -> None:
        from moco_d2.evaluation.features import make_eval_loader

        k = cfg.KNN
        tf = build_eval_transform(k.CROP_SIZE, k.RESIZE, cfg.AUG.MEAN, cfg.AUG.STD)
        bank = SafeImageFolder(k.TRAIN_ROOT, tf, max_bad_fraction=cfg.DATA.MAX_BAD_FRACTION)
        queries = SafeImageFolder(k.VAL_ROOT, tf, max_bad_fraction=cfg.DATA.MAX_BAD_FRACTION)
        if bank.classes != queries.classes:
            raise UserError(
                f"KNN.TRAIN_ROOT and KNN.VAL_ROOT have different class folders ({k.TRAIN_ROOT}, {k.VAL_ROOT})"
            )
        workers = min(int(cfg.DATA.NUM_WORKERS), 4)
        self.bank_loader = make_eval_loader(bank, k.BATCH_SIZE, workers, cfg.DATA.PIN_MEMORY)
        self.query_loader = make_eval_loader(queries, k.BATCH_SIZE, workers, cfg.DATA.PIN_MEMORY)
        self.num_classes, self.k, self.t, self.device = len(bank.classes), k.K, k.T, device

    def __call__(self, moco: MoCo) -> dict[str, float]:
        from moco_d2.evaluation.features import ResNetTrunk
        from moco_d2.evaluation.knn import knn_evaluate

        # Ranks keep their own BN running statistics; evaluate (and checkpoint) rank 0's everywhere.
        for buf in moco.encoder_q.buffers():
            dist_utils.broadcast_(buf, src=0)
        trunk = ResNetTrunk(moco.encoder_q)
        return knn_evaluate(
            trunk, self.bank_loader, self.query_loader, self.num_classes, self.k, self.t, self.device
        )


class PeriodMeter:
    """Loss/accuracy averages and timing over one logging period.

    ``data_time_frac`` is the fraction of the period spent waiting for the loader (and host-to-device
    copies); the step itself synchronises (the loss is read every step), so the timing is real on CUDA.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums, self.steps = torch.zeros(3, dtype=torch.float64), 0
        self.data_time, self.total_time = 0.0, 0.0

    def update(self, stats: torch.Tensor, data_time: float, total_time: float) -> None:
        self.sums += stats.double()
        self.steps += 1
        self.data_time += data_time
        self.total_time += total_time

    def summary(self, global_batch: int) -> dict[str, float]:
        loss, acc1, acc5 = (self.sums / max(self.steps, 1)).tolist()
        elapsed = max(self.total_time, 1e-9)
        return {
            "loss": loss,
            "acc1": acc1,
            "acc5": acc5,
            "images_per_sec": self.steps * global_batch / elapsed,
            "data_time_frac": self.data_time / elapsed,
        }


def wrap_ddp(moco: MoCo, device: torch.device) -> DistributedDataParallel:
    """DDP that averages the query encoder's gradients over processes.

    Buffers are not broadcast each step: the queue is identical on every rank by construction, and a
    rank's BN running statistics only matter through rank 0's checkpoint (as with the default).
    """
    return dist_utils.wrap_ddp(moco, device, sync_buffers=False)


def _cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call, if installed."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@dataclass
class Run:
    """What one pretraining run carries from step to step, so the loop's pieces stay short functions."""

    cfg: CfgNode
    info: DistInfo
    moco: MoCo
    model: nn.Module  # ``moco``, DDP-wrapped on many processes
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    device_stage: Callable | None  # the augmentation's device half (AUG.IMPL "gpu"), if any
    sampler: EpochBatchSampler
    loader: DataLoader
    bad_tracker: BadImageTracker
    manager: CheckpointManager
    writer: MetricWriter
    knn: KnnMonitor | None
    epoch: int = 0
    epoch_step: int = 0
    iteration: int = 0
    last_stats: torch.Tensor = field(default_factory=lambda: torch.full((3,), float("nan")))

    def save(self, name: str, ep: int, ep_step: int) -> None:
        if self.info.is_main:
            state = checkpoint_state(
                self.cfg, self.moco, self.optimizer, self.scaler, ep, ep_step, self.iteration
            )
            logger.info("saved %s", self.manager.save(state, name))

    def save_where_stopped(self) -> None:
        """A mid-epoch checkpoint, or the epoch-end one after an epoch's last step; moves the position."""
        ep, step = self.epoch, self.epoch_step
        if step < self.sampler.steps_per_epoch:
            self.save(CheckpointManager.name_for(ep, step, self.iteration), ep, step)
            return
        self.epoch, self.epoch_step = ep + 1, 0
        self.save(CheckpointManager.name_for(ep + 1), ep + 1, 0)

    def summary(self, stopped: bool, signum: int | None = None) -> dict:
        return summary(self.iteration, self.epoch, self.last_stats, stopped, signum)


def _start_output(cfg: CfgNode, manager: CheckpointManager) -> None:
    """Main process only: create OUTPUT_DIR, clear a killed save's temp files, write config.yaml."""
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    manager.remove_stale_temp_files()  # left by a killed save; this process is OUTPUT_DIR's only writer
    text = cfg.dump()  # replaces a symlink planted at config.yaml, never writes through it
    atomic_write(out / "config.yaml", lambda f: f.write(text.encode()), what="config")


def _build_moco(cfg: CfgNode, info: DistInfo) -> tuple[MoCo, torch.memory_format]:
    """The model, identical on every rank (seeded), on the device, in its memory format, maybe compiled."""
    device = info.device
    torch.manual_seed(cfg.SEED)  # identical initial weights and queue on every rank
    moco = build_model(cfg, info.world_size).to(device)
    memory_format = torch.channels_last if channels_last_for(cfg, device) else torch.contiguous_format
    moco = moco.to(memory_format=memory_format)
    if cfg.TRAIN.COMPILE and device.type == "cpu" and not _cpp_compiler():
        logger.warning("TRAIN.COMPILE: no C++ compiler (g++ or $CXX) for the CPU code; running eager instead")
    elif cfg.TRAIN.COMPILE:
        moco.compile_encoders(mode=cfg.TRAIN.COMPILE_MODE)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return moco, memory_format


def setup(cfg: CfgNode, info: DistInfo) -> Run:
    """Data, model, optimizer and the resumed position: everything before the first step."""
    device, world = info.device, info.world_size
    resume = find_resume(cfg)  # before anything is written to OUTPUT_DIR
    manager = CheckpointManager(cfg.OUTPUT_DIR, keep_last=cfg.CHECKPOINT.KEEP_LAST)
    if info.is_main:
        _start_output(cfg, manager)
    images, sampler, loader = build_train_data(cfg, info)
    bad_tracker = BadImageTracker(len(images), cfg.DATA.MAX_BAD_FRACTION, images.root)
    moco, memory_format = _build_moco(cfg, info)
    optimizer = build_optimizer(cfg, moco, device)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    device_stage = build_device_stage(cfg.AUG, device)
    epoch, epoch_step, iteration = 0, 0, 0
    if resume is not None:
        epoch, epoch_step, iteration = load_training_state(
            resume, cfg, moco, optimizer, scaler, sampler.steps_per_epoch
        )
    model = wrap_ddp(moco, device) if world > 1 else moco
    knn_on = cfg.KNN.EVAL_PERIOD > 0 and cfg.KNN.TRAIN_ROOT and cfg.KNN.VAL_ROOT
    knn = KnnMonitor(cfg, device) if knn_on else None
    # Continuing (RESUME auto / a path) re-runs the iterations after the checkpoint: drop their old records.
    writer = MetricWriter(
        cfg.OUTPUT_DIR,
        enabled=info.is_main,
        tensorboard=cfg.LOG.TENSORBOARD,
        resume_step=iteration if cfg.RESUME else None,
    )
    logger.info(
        "MoCo %s: %d process(es), global batch %d, %d BN group(s) per process, %d steps/epoch, "
        "epochs %d, K %d, T %g, device %s, amp %s",
        cfg.MODEL.ARCH, world, cfg.SOLVER.BATCH_SIZE, bn_splits_for(cfg, world), sampler.steps_per_epoch,
        cfg.SOLVER.EPOCHS, cfg.MODEL.K, cfg.MODEL.T, device, amp_dtype,
    )  # fmt: skip
    return Run(
        cfg, info, moco, model, optimizer, scaler, amp_dtype, memory_format, device_stage, sampler, loader,
        bad_tracker, manager, writer, knn, epoch, epoch_step, iteration,
    )  # fmt: skip


def _step(run: Run, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
    """One seeded training step on a batch already on the device; advances the position."""
    cfg = run.cfg
    if run.device_stage is not None:  # e.g. colour/blur/normalise, seeded by (seed, step, rank)
        g = torch.Generator().manual_seed(mix_seed(cfg.SEED, GPU_AUG_STREAM, run.iteration, run.info.rank))
        im_q, im_k = run.device_stage(im_q, g), run.device_stage(im_k, g)
    generator = torch.Generator().manual_seed(mix_seed(cfg.SEED, SHUFFLE_STREAM, run.iteration))
    try:
        stats = train_step(run.model, run.optimizer, im_q, im_k, generator, run.scaler, run.amp_dtype)
    except NonFiniteLossError as exc:
        raise NonFiniteLossError(
            f"{exc} at iteration {run.iteration} (epoch {run.epoch}, step {run.epoch_step}); stopping. "
            f"Checkpoints in {str(Path(cfg.OUTPUT_DIR))!r} are intact: lower SOLVER.BASE_LR or check the "
            "data, then RESUME auto"
        ) from None
    run.last_stats = stats.cpu()
    run.iteration += 1
    run.epoch_step += 1


def _log_period(run: Run, meter: PeriodMeter, lr: float, bar) -> None:
    """Write the logging period's averages (train/ scalars) and restart the meter."""
    scalars = meter.summary(run.cfg.SOLVER.BATCH_SIZE)
    scalars.update(lr=lr, epoch=run.epoch + run.epoch_step / run.sampler.steps_per_epoch)
    run.writer.write(run.iteration, scalars, prefix="train")
    bar.set_postfix_str(f"loss {scalars['loss']:.4f} acc1 {scalars['acc1']:.1f} lr {lr:.4g}")
    meter.reset()


def train_one_epoch(run: Run, stop: dist_utils.StopSignals) -> dict | None:
    """The epoch's remaining steps; the run's summary if it stops inside the epoch (signal, MAX_ITERS)."""
    cfg, device, steps_per_epoch = run.cfg, run.info.device, run.sampler.steps_per_epoch
    lr = learning_rate(cfg, run.epoch)
    set_lr(run.optimizer, lr)
    run.sampler.set_epoch(run.epoch, run.epoch_step)
    main, desc = run.info.is_main, f"epoch {run.epoch}"
    bar = progress(run.loader, total=len(run.sampler), desc=desc, enabled=main, period=cfg.LOG.PERIOD)
    meter, period_iters, max_iters = PeriodMeter(), int(cfg.CHECKPOINT.PERIOD_ITERS), int(cfg.TRAIN.MAX_ITERS)
    tick = time.perf_counter()
    for im_q, im_k, skipped in bar:
        run.bad_tracker.update(skipped)
        im_q = im_q.to(device, non_blocking=True).contiguous(memory_format=run.memory_format)
        im_k = im_k.to(device, non_blocking=True).contiguous(memory_format=run.memory_format)
        data_time = time.perf_counter() - tick
        _step(run, im_q, im_k)
        now = time.perf_counter()
        meter.update(run.last_stats, data_time, now - tick)
        tick = now
        boundary = run.iteration % cfg.LOG.PERIOD == 0 or run.epoch_step == steps_per_epoch
        if boundary:
            _log_period(run, meter, lr, bar)
        if period_iters and run.iteration % period_iters == 0 and run.epoch_step < steps_per_epoch:
            run.save(
                CheckpointManager.name_for(run.epoch, run.epoch_step, run.iteration),
                run.epoch,
                run.epoch_step,
            )
        if boundary and stop.agreed(device):  # preemption / torchrun shutdown: every rank stops here
            bar.close()
            run.save_where_stopped()
            logger.warning(
                "stopped by %s after iteration %d (epoch %d); checkpoint saved: continue with RESUME auto",
                stop.name, run.iteration, run.epoch,
            )  # fmt: skip
            run.writer.close()
            received = stop.received or int(signal.SIGTERM)  # another rank's signal: stop alike
            return run.summary(stopped=True, signum=received)
        if max_iters and run.iteration >= max_iters:
            logger.info(
                "TRAIN.MAX_ITERS=%d reached: stopping without a checkpoint (simulated kill)", max_iters
            )
            bar.close()
            run.writer.close()
            return run.summary(stopped=True)
    bar.close()
    return None


def train(cfg: CfgNode, info: DistInfo) -> dict:
    """Run (or continue) the whole schedule; returns a summary (iteration, epoch, last loss, stopped)."""
    check_config(cfg, info.world_size)
    run = setup(cfg, info)
    with dist_utils.StopSignals() as stop:
        run.model.train()
        while run.epoch < cfg.SOLVER.EPOCHS:
            stopped = train_one_epoch(run, stop)
            if stopped is not None:
                return stopped
            run.epoch, run.epoch_step = run.epoch + 1, 0
            run.save(CheckpointManager.name_for(run.epoch), run.epoch, 0)
            if run.knn is not None and run.epoch % cfg.KNN.EVAL_PERIOD == 0:
                result = run.knn(run.moco)
                logger.info("epoch %d: kNN top-1 %.2f top-5 %.2f", run.epoch, result["top1"], result["top5"])
                run.writer.write(
                    run.iteration, {"top1": result["top1"], "top5": result["top5"]}, prefix="knn"
                )
            run.writer.flush()
        if info.is_main:
            final = Path(cfg.OUTPUT_DIR) / "model_final.pth"
            save_atomic(
                checkpoint_state(cfg, run.moco, run.optimizer, run.scaler, run.epoch, 0, run.iteration), final
            )
            logger.info("done: %s", final)
        run.writer.close()
        return run.summary(stopped=False)


def summary(
    iteration: int, epoch: int, stats: torch.Tensor, stopped: bool, signum: int | None = None
) -> dict:
    loss, acc1, acc5 = stats.tolist()
    return {
        "iteration": iteration,
        "epoch": epoch,
        "loss": loss,
        "acc1": acc1,
        "acc5": acc5,
        "stopped": stopped,
        "signal": signum,
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = default_argument_parser("MoCo pretraining").parse_args(argv)
    cfg = load_config(pretrain_defaults(), args.config_file, args.opts)
    info = dist_utils.init_distributed(cfg.TRAIN.DEVICE)
    check_config(cfg, info.world_size)  # before OUTPUT_DIR is created
    setup_logging(cfg.OUTPUT_DIR, info.rank)
    try:
        result = train(cfg, info)
    except BaseException:
        # The loader workers ignore SIGTERM (a preemption notice must not kill them before the
        # checkpoint): end them here, or the interpreter's exit handler waits for them forever.
        dist_utils.kill_workers()
        raise
    finally:
        dist_utils.cleanup()
    if result.get("signal"):  # stopped cleanly by a signal: report it the way the shell would (128 + N)
        raise SystemExit(128 + int(result["signal"]))
    return result


if __name__ == "__main__":
    main()
