"""MoCo pretraining loop: ``python -m pretrain.train --config-file configs/pretrain/X.yaml [KEY VALUE ...]``.

One plain loop for every scale: one CPU process, one GPU, ``torchrun --nproc_per_node 8``, many nodes.
Every random choice is a function of (SEED, epoch, step or sample index), and every checkpoint holds
the whole training state, so ``RESUME auto`` after a kill continues exactly where the run stopped,
mid-epoch included (bit-identical on the CPU).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from moco_d2.core import distributed as dist_utils
from moco_d2.core.backbone import check_pretrain_arch
from moco_d2.core.config import default_argument_parser, load_config, pretrain_defaults
from moco_d2.core.distributed import DistInfo
from moco_d2.core.errors import UserError, exit_on_user_error
from moco_d2.core.images import SafeImageFolder, build_eval_transform, mix_seed
from moco_d2.core.io import CheckpointManager, atomic_write, choose_resume, load_checkpoint, save_atomic
from moco_d2.core.metrics import MetricWriter, progress, setup_logging
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
    """bf16 where the GPU supports it, fp16 (with GradScaler) otherwise; None = full precision."""
    if not (cfg.TRAIN.AMP and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
    state = {
        "epoch": epoch,
        "arch": cfg.MODEL.ARCH,
        "state_dict": {f"module.{k}": v for k, v in moco.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "epoch_step": epoch_step,
        "config": cfg.dump(),
        "kind": CHECKPOINT_KIND,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


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
    ckpt = load_checkpoint(path)
    name = str(path)
    if "state_dict" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"RESUME {name!r} is not a MoCo training checkpoint (needs 'epoch' and 'state_dict')")
    if ckpt.get("kind", CHECKPOINT_KIND) != CHECKPOINT_KIND:
        raise UserError(f"RESUME {name!r} is a {ckpt['kind']!r} checkpoint, not a MoCo pretraining one")
    if ckpt.get("arch", cfg.MODEL.ARCH) != cfg.MODEL.ARCH:
        raise UserError(f"RESUME {name!r} is a {ckpt['arch']} checkpoint but MODEL.ARCH is {cfg.MODEL.ARCH}")
    sd = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    ours = moco.state_dict()
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise UserError(
            f"RESUME {name!r} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            f" ({len(missing)} missing, {len(unexpected)} unexpected; check MODEL.MLP / MODEL.ARCH)"
        )
    for k, v in sd.items():
        if v.shape != ours[k].shape:
            raise UserError(
                f"RESUME {name!r}: {k} has shape {tuple(v.shape)}, the model has {tuple(ours[k].shape)} "
                "(check MODEL.DIM / MODEL.K / MODEL.ARCH)"
            )
    moco.load_state_dict(sd)
    if "optimizer" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"RESUME {name!r}: optimizer state does not match the model ({exc})") from None
    else:
        logger.warning("RESUME %s has no optimizer state; SGD momentum restarts from zero", name)
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
    ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:  # torch >= 2.14
        return DistributedDataParallel(moco, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(moco, device_ids=ids, broadcast_buffers=False)


# Long (154 lines) pending the shared epoch-loop refactor (issue 15, point d): the step, checkpoint and
# stop protocol are one sequence whose order the float64 and resume-exactness tests pin.
def _cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call, if installed."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def train(cfg: CfgNode, info: DistInfo) -> dict:
    """Run (or continue) the whole schedule; returns a summary (iteration, epoch, last loss, stopped)."""
    device, world, main = info.device, info.world_size, info.is_main
    check_config(cfg, world)
    out = Path(cfg.OUTPUT_DIR)
    resume = find_resume(cfg)  # before anything is written to OUTPUT_DIR
    manager = CheckpointManager(out, keep_last=cfg.CHECKPOINT.KEEP_LAST)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        manager.remove_stale_temp_files()  # left by a killed save; this process is OUTPUT_DIR's only writer
        text = cfg.dump()  # replaces a symlink planted at config.yaml, never writes through it
        atomic_write(out / "config.yaml", lambda f: f.write(text.encode()), what="config")
    images, sampler, loader = build_train_data(cfg, info)
    bad_tracker = BadImageTracker(len(images), cfg.DATA.MAX_BAD_FRACTION, images.root)
    steps_per_epoch = sampler.steps_per_epoch

    torch.manual_seed(cfg.SEED)  # identical initial weights and queue on every rank
    moco = build_model(cfg, world).to(device)
    channels_last = cfg.TRAIN.CHANNELS_LAST and device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    moco = moco.to(memory_format=memory_format)
    if cfg.TRAIN.COMPILE and device.type == "cpu" and not _cpp_compiler():
        logger.warning("TRAIN.COMPILE: no C++ compiler (g++ or $CXX) for the CPU code; running eager instead")
    elif cfg.TRAIN.COMPILE:
        moco.compile_encoders(mode=cfg.TRAIN.COMPILE_MODE)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = build_optimizer(cfg, moco, device)
    amp_dtype = amp_dtype_for(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    device_stage = build_device_stage(cfg.AUG, device)  # the augmentation's device half, if any

    epoch, epoch_step, iteration = 0, 0, 0
    if resume is not None:
        epoch, epoch_step, iteration = load_training_state(
            resume, cfg, moco, optimizer, scaler, steps_per_epoch
        )
    model = wrap_ddp(moco, device) if world > 1 else moco
    knn = (
        KnnMonitor(cfg, device)
        if cfg.KNN.EVAL_PERIOD > 0 and cfg.KNN.TRAIN_ROOT and cfg.KNN.VAL_ROOT
        else None
    )

    # Continuing (RESUME auto / a path) re-runs the iterations after the checkpoint: drop their old records.
    writer = MetricWriter(
        out, enabled=main, tensorboard=cfg.LOG.TENSORBOARD, resume_step=iteration if cfg.RESUME else None
    )
    logger.info(
        "MoCo %s: %d process(es), global batch %d, %d BN group(s) per process, %d steps/epoch, "
        "epochs %d, K %d, T %g, device %s, amp %s",
        cfg.MODEL.ARCH,
        world,
        cfg.SOLVER.BATCH_SIZE,
        bn_splits_for(cfg, world),
        steps_per_epoch,
        cfg.SOLVER.EPOCHS,
        cfg.MODEL.K,
        cfg.MODEL.T,
        device,
        amp_dtype,
    )

    def save(name: str, ep: int, ep_step: int) -> None:
        if main:
            path = manager.save(checkpoint_state(cfg, moco, optimizer, scaler, ep, ep_step, iteration), name)
            logger.info("saved %s", path)

    def save_where_stopped(ep: int, ep_step: int) -> tuple[int, int]:
        """A mid-epoch checkpoint, or the epoch-end one after an epoch's last step; the new position."""
        if ep_step < steps_per_epoch:
            save(CheckpointManager.name_for(ep, ep_step, iteration), ep, ep_step)
            return ep, ep_step
        save(CheckpointManager.name_for(ep + 1), ep + 1, 0)
        return ep + 1, 0

    last_stats = torch.full((3,), float("nan"))
    max_iters = int(cfg.TRAIN.MAX_ITERS)
    period_iters = int(cfg.CHECKPOINT.PERIOD_ITERS)
    with dist_utils.StopSignals() as stop:
        model.train()
        while epoch < cfg.SOLVER.EPOCHS:
            lr = learning_rate(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sampler.set_epoch(epoch, epoch_step)
            bar = progress(
                loader, total=len(sampler), desc=f"epoch {epoch}", enabled=main, period=cfg.LOG.PERIOD
            )
            meter = PeriodMeter()
            tick = time.perf_counter()
            for im_q, im_k, skipped in bar:
                bad_tracker.update(skipped)
                im_q = im_q.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                im_k = im_k.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                data_time = time.perf_counter() - tick
                if device_stage is not None:  # e.g. colour/blur/normalise, seeded by (seed, step, rank)
                    g = torch.Generator().manual_seed(
                        mix_seed(cfg.SEED, GPU_AUG_STREAM, iteration, info.rank)
                    )
                    im_q, im_k = device_stage(im_q, g), device_stage(im_k, g)
                generator = torch.Generator().manual_seed(mix_seed(cfg.SEED, SHUFFLE_STREAM, iteration))
                try:
                    stats = train_step(model, optimizer, im_q, im_k, generator, scaler, amp_dtype)
                except NonFiniteLossError as exc:
                    raise NonFiniteLossError(
                        f"{exc} at iteration {iteration} (epoch {epoch}, step {epoch_step}); stopping. "
                        f"Checkpoints in {str(out)!r} are intact: lower SOLVER.BASE_LR or check the data, "
                        "then RESUME auto"
                    ) from None
                last_stats = stats.cpu()
                iteration += 1
                epoch_step += 1
                now = time.perf_counter()
                meter.update(last_stats, data_time, now - tick)
                tick = now
                boundary = iteration % cfg.LOG.PERIOD == 0 or epoch_step == steps_per_epoch
                if boundary:
                    scalars = meter.summary(cfg.SOLVER.BATCH_SIZE)
                    scalars.update(lr=lr, epoch=epoch + epoch_step / steps_per_epoch)
                    writer.write(iteration, scalars, prefix="train")
                    bar.set_postfix_str(f"loss {scalars['loss']:.4f} acc1 {scalars['acc1']:.1f} lr {lr:.4g}")
                    meter.reset()
                if period_iters and iteration % period_iters == 0 and epoch_step < steps_per_epoch:
                    save(CheckpointManager.name_for(epoch, epoch_step, iteration), epoch, epoch_step)
                # Preemption / torchrun shutdown: every rank stops here, after a checkpoint.
                if boundary and stop.agreed(device):
                    bar.close()
                    epoch, epoch_step = save_where_stopped(epoch, epoch_step)
                    logger.warning(
                        "stopped by %s after iteration %d (epoch %d); checkpoint saved: continue with RESUME auto",
                        stop.name,
                        iteration,
                        epoch,
                    )
                    writer.close()
                    received = stop.received or int(signal.SIGTERM)  # another rank's signal: stop alike
                    return summary(iteration, epoch, last_stats, stopped=True, signum=received)
                if max_iters and iteration >= max_iters:
                    logger.info(
                        "TRAIN.MAX_ITERS=%d reached: stopping without a checkpoint (simulated kill)",
                        max_iters,
                    )
                    bar.close()
                    writer.close()
                    return summary(iteration, epoch, last_stats, stopped=True)
            bar.close()
            epoch, epoch_step = epoch + 1, 0
            save(CheckpointManager.name_for(epoch), epoch, 0)
            if knn is not None and epoch % cfg.KNN.EVAL_PERIOD == 0:
                result = knn(moco)
                logger.info("epoch %d: kNN top-1 %.2f top-5 %.2f", epoch, result["top1"], result["top5"])
                writer.write(iteration, {"top1": result["top1"], "top5": result["top5"]}, prefix="knn")
            writer.flush()
        if main:
            save_atomic(
                checkpoint_state(cfg, moco, optimizer, scaler, epoch, 0, iteration), out / "model_final.pth"
            )
            logger.info("done: %s", out / "model_final.pth")
        writer.close()
        return summary(iteration, epoch, last_stats, stopped=False)


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
