"""Linear classification on frozen features (the MoCo paper's protocol), and the supervised baseline.

Linear protocol (MODEL.FREEZE_BACKBONE True, the default): a pretrained ResNet (our MoCo checkpoint, an
official one, or any checkpoint ``moco_d2.core.backbone`` reads) gets a new fc, normal(0, 0.01) weights and
zero bias; everything else is frozen and the network stays in eval mode, so BatchNorm statistics never
move. Only fc.weight and fc.bias reach the optimizer. At the end every backbone tensor is compared
with the pretrained one, as the official ``main_lincls.py`` does.

Supervised baseline (MODEL.FREEZE_BACKBONE False, no MODEL.WEIGHTS): the same loop trains the whole,
randomly initialised network on the labels; its checkpoint has kind "supervised".

    python -m moco_d2.evaluation.lincls --config-file configs/lincls/lincls_in1k.yaml \\
        MODEL.WEIGHTS ckpt.pth DATA.ROOT /path/to/imagenet OUTPUT_DIR output/lincls
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from moco_d2.core.backbone import ARCHS, BackboneState, build_resnet, load_backbone, read_backbone
from moco_d2.core.config import default_argument_parser, load_config, run_defaults
from moco_d2.core.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    is_main_process,
    wrap_ddp,
)
from moco_d2.core.errors import UserError, exit_on_user_error
from moco_d2.core.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_lincls_train_transform,
    labelled_split_pair,
    mix_seed,
)
from moco_d2.core.io import (
    CheckpointManager,
    choose_resume,
    publish_copy,
    save_atomic,
    write_json_atomic,
)
from moco_d2.core.metrics import AverageMeter, MetricWriter, progress, setup_logging
from moco_d2.core.training import (
    load_resume_checkpoint,
    load_state_checked,
    restore_optimizer,
    seed_epoch,
    set_lr,
    training_checkpoint,
)

# An import list like knn.py's (the duplicates tool pairs them): names, no logic.
from moco_d2.evaluation.features import (
    cached_split_features,
    eval_batches,
    make_eval_loader,
    report_skipped,
    skipped_over_ranks,
    topk_correct,
)

logger = logging.getLogger("moco")


class SanityCheckError(RuntimeError):
    """The frozen backbone changed during linear classification: the reported accuracy is invalid."""


def lincls_defaults() -> CfgNode:
    """The official linear-classification recipe (ResNet-50, 100 epochs, lr 30, global batch 256)."""
    c = run_defaults("output/lincls")
    c.MODEL.WEIGHTS = ""  # pretrained checkpoint; required when FREEZE_BACKBONE is True
    c.MODEL.FREEZE_BACKBONE = True  # False = supervised training of the whole network
    c.MODEL.NUM_CLASSES = 0  # 0 = number of class folders in DATA.ROOT/DATA.TRAIN_SPLIT

    c.DATA = CfgNode()
    c.DATA.ROOT = "datasets/imagenet"  # ImageFolder root with TRAIN_SPLIT/ and VAL_SPLIT/
    c.DATA.TRAIN_SPLIT = "train"
    c.DATA.VAL_SPLIT = "val"
    c.DATA.CROP_SIZE = 224  # RandomResizedCrop size (train) and CenterCrop size (val)
    c.DATA.RESIZE = 256  # val: shorter side resized to this before the center crop
    c.DATA.MEAN = list(IMAGENET_MEAN)
    c.DATA.STD = list(IMAGENET_STD)
    c.DATA.NUM_WORKERS = 8  # loader workers per process
    c.DATA.PIN_MEMORY = True
    c.DATA.MAX_BAD_FRACTION = 0.001  # stop when more than this fraction of images is unreadable
    # With TRAIN.PRECOMPUTED_FEATURES: the file caching both splits' features ("" = OUTPUT_DIR/features.pt);
    # give the kNN evaluation of the same checkpoint the same file and the images are read once for both.
    c.DATA.FEATURES_CACHE = ""

    c.SOLVER = CfgNode()
    c.SOLVER.EPOCHS = 100
    c.SOLVER.BATCH_SIZE = 256  # global batch over all processes
    c.SOLVER.BASE_LR = 30.0
    c.SOLVER.MOMENTUM = 0.9
    c.SOLVER.WEIGHT_DECAY = 0.0
    c.SOLVER.STEPS = [60, 80]  # epochs where lr is multiplied by GAMMA
    c.SOLVER.GAMMA = 0.1

    c.TRAIN = CfgNode()
    c.TRAIN.DEVICE = "auto"  # "auto", "cuda" or "cpu"
    c.TRAIN.AMP = False  # bf16 autocast on CUDA (the official recipe is fp32)
    c.TRAIN.MAX_ITERS = 0  # stop after this many iterations in this run (0 = all epochs); simulates a kill
    # Frozen backbone only: compute every image's pooled feature ONCE, through the validation transform
    # (resize + centre crop), and train the fc on those (seconds per epoch). The paper's recipe instead
    # sees each training image through RandomResizedCrop + flip, a new crop every epoch.
    c.TRAIN.PRECOMPUTED_FEATURES = False
    # With PRECOMPUTED_FEATURES: standardise each feature dimension with the training features' mean and
    # std before the fc (a BatchNorm without affine, as MAE's linear probe), so one lr suits every
    # backbone whatever its feature scale; the saved fc has the standardisation folded in.
    c.TRAIN.STANDARDIZE_FEATURES = False

    c.CHECKPOINT = CfgNode()
    c.CHECKPOINT.KEEP_LAST = 2

    c.LOG = CfgNode()
    c.LOG.PERIOD = 20
    c.LOG.TENSORBOARD = True
    return c


# ----------------------------------------------------------------------------------------------------
# Model


def load_pretrained(cfg: CfgNode) -> BackboneState | None:
    """The checkpoint's ResNet backbone, checked against MODEL.ARCH; None for a supervised run."""
    if not cfg.MODEL.WEIGHTS:
        if cfg.MODEL.FREEZE_BACKBONE:
            raise UserError(
                "MODEL.WEIGHTS is empty: linear classification needs a pretrained checkpoint "
                "(set MODEL.FREEZE_BACKBONE False to train a supervised model from scratch)"
            )
        return None
    return read_backbone(cfg.MODEL.WEIGHTS, cfg.MODEL.ARCH)


def build_model(
    cfg: CfgNode, num_classes: int, state: BackboneState | None = None
) -> tuple[nn.Module, dict[str, torch.Tensor] | None, str]:
    """The classifier and, in the linear protocol, the pretrained backbone tensors it must keep.

    Returns (model, pretrained backbone state or None, description of the weights' source).
    """
    arch = cfg.MODEL.ARCH
    if arch not in ARCHS:
        raise UserError(f"MODEL.ARCH: {arch!r} is not a torchvision ResNet ({', '.join(ARCHS)})")
    if state is None:
        state = load_pretrained(cfg)
    pretrained = None
    source = "random initialisation"
    if state is None:
        model = build_resnet(arch, num_classes=num_classes)
    else:
        model, _ = load_backbone(state, arch, f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r}", num_classes=num_classes)
        pretrained = {k: v.clone() for k, v in state.state_dict.items()}
        source = f"{state.source}: {cfg.MODEL.WEIGHTS}"
    # The new classifier, initialised as in the official code.
    model.fc.weight.data.normal_(mean=0.0, std=0.01)
    model.fc.bias.data.zero_()
    if cfg.MODEL.FREEZE_BACKBONE:
        for name, p in model.named_parameters():
            p.requires_grad = name in ("fc.weight", "fc.bias")
    return model, pretrained, source


def sanity_check(model: nn.Module, pretrained: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor (weights and BN buffers) must equal the pretrained one, bit for bit."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    if set(state) != set(pretrained):
        raise SanityCheckError(
            f"sanity check failed: backbone keys differ from the pretrained ones "
            f"({sorted(set(state) ^ set(pretrained))[:3]})"
        )
    changed = [k for k, v in state.items() if not torch.equal(v.cpu(), pretrained[k].cpu())]
    if changed:
        raise SanityCheckError(
            f"sanity check failed: {len(changed)} backbone tensors changed during linear classification, "
            f"e.g. {changed[0]}; the frozen-feature accuracy is invalid"
        )
    logger.info("sanity check passed: all %d backbone tensors equal the pretrained ones", len(state))


# ----------------------------------------------------------------------------------------------------
# Training


def _scalars(metrics: dict) -> dict:
    """The accuracy and loss of an :func:`evaluate` result (what goes to metrics.jsonl / TensorBoard)."""
    return {k: metrics[k] for k in ("top1", "top5", "loss")}


def lr_at(cfg: CfgNode, epoch: int) -> float:
    """Step schedule: BASE_LR x GAMMA^(number of STEPS reached)."""
    return cfg.SOLVER.BASE_LR * cfg.SOLVER.GAMMA ** sum(epoch >= m for m in cfg.SOLVER.STEPS)


def _check_cfg(cfg: CfgNode, world_size: int) -> None:
    s = cfg.SOLVER
    if s.BATCH_SIZE % world_size:
        raise UserError(f"SOLVER.BATCH_SIZE {s.BATCH_SIZE} is not divisible by the {world_size} processes")
    if s.EPOCHS < 1 or s.BATCH_SIZE < 1:
        raise UserError("SOLVER.EPOCHS and SOLVER.BATCH_SIZE must be >= 1")
    if cfg.DATA.NUM_WORKERS < 0:
        raise UserError(
            f"DATA.NUM_WORKERS must be >= 0 (0 = load in the main process), got {cfg.DATA.NUM_WORKERS}"
        )
    if not (math.isfinite(s.BASE_LR) and s.BASE_LR > 0):
        raise UserError(f"SOLVER.BASE_LR must be a positive number, got {s.BASE_LR}")
    if cfg.DATA.CROP_SIZE < 1 or cfg.DATA.RESIZE < cfg.DATA.CROP_SIZE:
        raise UserError(
            f"DATA.RESIZE ({cfg.DATA.RESIZE}) must be >= DATA.CROP_SIZE ({cfg.DATA.CROP_SIZE}) >= 1"
        )
    for key in ("TRAIN.STANDARDIZE_FEATURES", "DATA.FEATURES_CACHE"):
        section, name = key.split(".")
        if cfg[section][name] and not cfg.TRAIN.PRECOMPUTED_FEATURES:
            raise UserError(f"{key} needs TRAIN.PRECOMPUTED_FEATURES True")
    if cfg.TRAIN.PRECOMPUTED_FEATURES and not cfg.MODEL.FREEZE_BACKBONE:
        raise UserError(
            "TRAIN.PRECOMPUTED_FEATURES needs MODEL.FREEZE_BACKBONE True (a trained backbone changes its features)"
        )


def _datasets(cfg: CfgNode):
    root = Path(cfg.DATA.ROOT)
    train_tf = build_lincls_train_transform(cfg.DATA.CROP_SIZE, cfg.DATA.MEAN, cfg.DATA.STD)
    val_tf = build_eval_transform(cfg.DATA.CROP_SIZE, cfg.DATA.RESIZE, cfg.DATA.MEAN, cfg.DATA.STD)
    train, val = labelled_split_pair(
        root, cfg.DATA.TRAIN_SPLIT, cfg.DATA.VAL_SPLIT, train_tf, val_tf, cfg.DATA.MAX_BAD_FRACTION
    )
    return train, val


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> dict:
    """Top-1/top-5 (percent) and loss over the whole validation set; exact over all ranks.

    Also ``num_val`` (distinct readable images evaluated) and ``skipped`` (the unreadable files left
    out, over all ranks; ``make_eval_loader`` drops them instead of substituting another image).
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1 hits, top5 hits, loss sum, count
    skipped: list[str] = []
    bar = progress(eval_batches(loader), total=len(loader), desc="val", enabled=is_main_process())
    for images, target, bad in bar:
        skipped.extend(bad)
        if images is None:  # the whole batch was unreadable
            continue
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images).float()
        hits = topk_correct(logits, target, ks=(1, 5)).sum(dim=0)
        loss = nn.functional.cross_entropy(logits, target, reduction="sum")
        sums += torch.stack(
            [hits[0], hits[1], loss, torch.tensor(float(len(target)), device=device)]
        ).double()
    bar.close()
    top1, top5, loss, count = all_reduce_sum(sums).tolist()
    skipped = skipped_over_ranks(skipped, loader)
    n = max(count, 1.0)
    return {
        "top1": 100 * top1 / n,
        "top5": 100 * top5 / n,
        "loss": loss / n,
        "num_val": int(count),
        "skipped": skipped,
    }


def _num_classes(cfg: CfgNode, classes: int) -> int:
    """MODEL.NUM_CLASSES, or the training split's class count when it is 0."""
    num_classes = cfg.MODEL.NUM_CLASSES or classes
    if num_classes < classes:
        raise UserError(
            f"MODEL.NUM_CLASSES is {num_classes} but {cfg.DATA.TRAIN_SPLIT}/ has {classes} classes"
        )
    return num_classes


def _results(
    cfg: CfgNode, last: dict, best: dict, kind: str, num_classes: int, num_val: int, **tail: object
) -> dict:
    """The results.json fields both training paths share, then ``tail`` (skipped files, sanity check)."""
    results = {
        "top1": last["top1"],
        "top5": last["top5"],
        "best_top1": best["top1"],
        "best_top5": best["top5"],
        "best_epoch": best["epoch"],
        "epochs": cfg.SOLVER.EPOCHS,
        "checkpoint": cfg.MODEL.WEIGHTS,
        "arch": cfg.MODEL.ARCH,
        "kind": kind,
    }
    if "features" in tail:
        results["features"] = tail.pop("features")
    results.update(num_classes=num_classes, crop_size=cfg.DATA.CROP_SIZE, num_val=num_val, **tail)
    return results


def _checkpoint(
    cfg: CfgNode, model: nn.Module, optimizer, epoch: int, best: dict, kind: str, **extra
) -> dict:
    """The official lincls checkpoint (state_dict on the host) plus the weights it was trained on."""
    weights = cfg.MODEL.WEIGHTS
    return training_checkpoint(
        cfg, model, optimizer, epoch, kind, to_cpu=True, best_acc1=best["top1"], **extra, weights=weights
    )


@dataclass
class LinclsRun:
    """What one classification run carries between epochs, so the loop's pieces stay short functions."""

    cfg: CfgNode
    info: DistInfo
    model: nn.Module
    ddp: nn.Module  # ``model``, DDP-wrapped on many processes
    optimizer: torch.optim.Optimizer
    sampler: DistributedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    manager: CheckpointManager
    writer: MetricWriter
    kind: str  # "lincls" (frozen backbone) or "supervised"
    pretrained: dict[str, torch.Tensor] | None  # the backbone the linear protocol must keep
    num_classes: int
    start_epoch: int
    best: dict
    iteration: int = 0
    iters_this_run: int = 0

    @property
    def amp(self) -> bool:
        return self.cfg.TRAIN.AMP and self.info.device.type == "cuda" and torch.cuda.is_bf16_supported()


def _resume(path: Path, cfg: CfgNode, kind: str, model: nn.Module, optimizer) -> tuple[int, dict]:
    """Restore a run of the same kind, arch and MODEL.WEIGHTS; returns (next epoch, best so far)."""
    ckpt = load_resume_checkpoint(path, kind, cfg.MODEL.ARCH, kind)
    if ckpt.get("weights", "") != cfg.MODEL.WEIGHTS:
        raise UserError(
            f"RESUME {str(path)!r} continues a run on MODEL.WEIGHTS {ckpt.get('weights')!r}, "
            f"not {cfg.MODEL.WEIGHTS!r}; use another OUTPUT_DIR or RESUME ''"
        )
    sd = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    load_state_checked(model, sd, f"RESUME {str(path)!r}", hint="MODEL.ARCH / MODEL.NUM_CLASSES")
    restore_optimizer(optimizer, ckpt, str(path))
    start_epoch = int(ckpt["epoch"])
    best = {"top1": float(ckpt["best_acc1"]), "top5": float(ckpt.get("best_acc5", -1.0))}
    best["epoch"] = int(ckpt.get("best_epoch", 0))
    logger.info("resumed from %s (epoch %d)", path, start_epoch)
    return start_epoch, best


def _loaders(
    cfg: CfgNode, info: DistInfo, train_set, val_set
) -> tuple[DistributedSampler, DataLoader, DataLoader]:
    per_rank = cfg.SOLVER.BATCH_SIZE // info.world_size
    # The epoch's order is a function of (SEED, epoch), also with one process, so a resumed run sees
    # the same order as an uninterrupted one.
    sampler = DistributedSampler(train_set, info.world_size, info.rank, shuffle=True, seed=cfg.SEED)
    train_loader = DataLoader(
        train_set,
        batch_size=per_rank,
        sampler=sampler,
        num_workers=cfg.DATA.NUM_WORKERS,
        pin_memory=cfg.DATA.PIN_MEMORY and info.device.type == "cuda",
        drop_last=False,
        generator=torch.Generator(),  # reseeded every epoch: seeds the workers' augmentation
    )
    val_loader = make_eval_loader(val_set, per_rank, cfg.DATA.NUM_WORKERS, cfg.DATA.PIN_MEMORY)
    return sampler, train_loader, val_loader


def setup(cfg: CfgNode, info: DistInfo) -> LinclsRun:
    """Data, model, optimizer and the resumed epoch: everything before the first step."""
    _check_cfg(cfg, info.world_size)
    resume = choose_resume(
        cfg.RESUME, cfg.OUTPUT_DIR
    )  # a fresh run never rotates away another run's checkpoints
    state = load_pretrained(cfg)  # checkpoint problems are reported before the data is scanned
    train_set, val_set = _datasets(cfg)
    num_classes = _num_classes(cfg, len(train_set.classes))
    torch.manual_seed(cfg.SEED)  # identical fc / random init on every rank
    model, pretrained, source = build_model(cfg, num_classes, state)
    frozen = cfg.MODEL.FREEZE_BACKBONE
    kind = "lincls" if frozen else "supervised"
    model.to(info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    if frozen:
        assert len(params) == 2, "only fc.weight and fc.bias may be optimized"  # fc weight, fc bias
    s = cfg.SOLVER
    optimizer = torch.optim.SGD(params, s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    start_epoch, best = 0, {"top1": -1.0, "top5": -1.0, "epoch": 0}
    if resume is not None:
        start_epoch, best = _resume(resume, cfg, kind, model, optimizer)
    # Frozen BN buffers are identical everywhere and never change: no per-step broadcast.
    ddp = wrap_ddp(model, info.device, sync_buffers=not frozen) if info.world_size > 1 else model
    sampler, train_loader, val_loader = _loaders(cfg, info, train_set, val_set)
    writer = MetricWriter(cfg.OUTPUT_DIR, enabled=info.is_main, tensorboard=cfg.LOG.TENSORBOARD)
    if info.is_main:
        logger.info(
            "%s: %s %s, %d classes, weights from %s", kind, cfg.MODEL.ARCH, info.device, num_classes, source
        )
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        logger.info("trainable parameters: %s", trainable[:4])
    manager = CheckpointManager(cfg.OUTPUT_DIR, keep_last=cfg.CHECKPOINT.KEEP_LAST)
    return LinclsRun(
        cfg, info, model, ddp, optimizer, sampler, train_loader, val_loader, manager, writer, kind,
        pretrained, num_classes, start_epoch, best, iteration=start_epoch * len(train_loader),
    )  # fmt: skip


def train_one_epoch(run: LinclsRun, epoch: int) -> bool:
    """One epoch of SGD; True when TRAIN.MAX_ITERS stopped it early (a simulated kill, no checkpoint)."""
    cfg, device, amp = run.cfg, run.info.device, run.amp
    lr = lr_at(cfg, epoch)
    set_lr(run.optimizer, lr)
    run.sampler.set_epoch(epoch)
    seed_epoch(cfg.SEED, run.info.rank, epoch, run.train_loader.generator)
    # Linear protocol: eval mode throughout, so BN uses (and keeps) the pretrained statistics.
    run.ddp.train(not cfg.MODEL.FREEZE_BACKBONE)
    loss_meter, acc_meter = AverageMeter("loss"), AverageMeter("top1")
    loader = run.train_loader
    bar = progress(loader, total=len(loader), desc=f"epoch {epoch + 1}", enabled=run.info.is_main)
    for images, target in bar:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = run.ddp(images).float()
        loss = nn.functional.cross_entropy(logits, target)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.iteration += 1
        run.iters_this_run += 1
        loss_meter.update(loss.item(), len(target))
        acc_meter.update(topk_correct(logits.detach(), target, ks=(1,)).mean().item() * 100, len(target))
        if run.iteration % cfg.LOG.PERIOD == 0:
            stats = all_reduce_mean(torch.tensor([loss_meter.avg, acc_meter.avg], device=device)).tolist()
            run.writer.write(run.iteration, {"loss": stats[0], "top1": stats[1], "lr": lr}, prefix="train")
            bar.set_postfix_str(f"loss {stats[0]:.4f} top1 {stats[1]:.2f} lr {lr:g}")
        if cfg.TRAIN.MAX_ITERS and run.iters_this_run >= cfg.TRAIN.MAX_ITERS:
            bar.close()
            logger.info(
                "stopping after TRAIN.MAX_ITERS=%d iterations (epoch %d unfinished)",
                run.iters_this_run,
                epoch + 1,
            )
            return True
    bar.close()
    return False


def validate_and_save(run: LinclsRun, epoch: int) -> dict:
    """Evaluate after an epoch, update the best, write the checkpoint (and model_best / model_final)."""
    cfg = run.cfg
    last = evaluate(run.model, run.val_loader, run.info.device, run.amp)
    is_best = last["top1"] > run.best["top1"]
    if is_best:
        run.best = {"top1": last["top1"], "top5": last["top5"], "epoch": epoch + 1}
    run.writer.write(run.iteration, {**_scalars(last), "epoch": epoch + 1}, prefix="val")
    run.writer.flush()
    if run.info.is_main:
        best = run.best
        logger.info(
            "epoch %d/%d: val top1 %.3f top5 %.3f (best top1 %.3f @ %d)",
            epoch + 1, cfg.SOLVER.EPOCHS, last["top1"], last["top5"], best["top1"], best["epoch"],
        )  # fmt: skip
        extra = {"best_acc5": best["top5"], "best_epoch": best["epoch"]}
        ckpt = _checkpoint(cfg, run.model, run.optimizer, epoch + 1, best, run.kind, **extra)
        path = run.manager.save(ckpt, CheckpointManager.name_for(epoch + 1))
        if is_best:
            publish_copy(path, Path(cfg.OUTPUT_DIR) / "model_best.pth")
        if epoch + 1 == cfg.SOLVER.EPOCHS:
            publish_copy(path, Path(cfg.OUTPUT_DIR) / "model_final.pth")
        logger.info("saved %s", path)
    barrier()
    return last


def train(cfg: CfgNode, dist_info: DistInfo) -> dict:
    """Run the whole schedule (resuming if asked); returns the results dict written to results.json."""
    run = setup(cfg, dist_info)
    last = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    for epoch in range(run.start_epoch, cfg.SOLVER.EPOCHS):
        if train_one_epoch(run, epoch):
            run.writer.close()
            return {}
        last = validate_and_save(run, epoch)
    run.writer.close()
    if run.pretrained is not None:
        sanity_check(run.model, run.pretrained)
    if math.isnan(last["top1"]):  # resumed after the last epoch: report the final checkpoint's numbers
        last = evaluate(run.model, run.val_loader, dist_info.device, run.amp)
    results = _results(
        cfg, last, run.best, run.kind, run.num_classes, last["num_val"],
        **report_skipped(f"validation ({cfg.DATA.VAL_SPLIT}/)", last["skipped"]),
        sanity_check="passed" if run.pretrained is not None else "not applicable (backbone trained)",
    )  # fmt: skip
    if dist_info.is_main:
        write_json_atomic(results, Path(cfg.OUTPUT_DIR) / "results.json")
        logger.info("results: %s", json.dumps(results))
    return results


# ----------------------------------------------------------------------------------------------------
# Linear probe on features computed once (TRAIN.PRECOMPUTED_FEATURES)


def _cached_features(cfg: CfgNode, model: nn.Module, datasets: tuple, dist_info: DistInfo) -> dict:
    """Pooled (not normalised) features, labels and skipped files of both splits, through the validation
    transform (``split_features``): cached in DATA.FEATURES_CACHE (default OUTPUT_DIR/features.pt), so a
    rerun (after a crash, or with another schedule) trains the fc without touching an image, and a kNN
    evaluation of the same checkpoint writing the same file spares the extraction altogether.
    """
    d = cfg.DATA
    return cached_split_features(
        model,
        datasets,
        d,
        cfg.MODEL.WEIGHTS,
        cfg.TRAIN.AMP,
        max(1, cfg.SOLVER.BATCH_SIZE // dist_info.world_size),
        dist_info.device,
        Path(d.FEATURES_CACHE or Path(cfg.OUTPUT_DIR) / "features.pt"),
    )


def _fc_metrics(fc: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = fc(feats)
        hits = topk_correct(logits, labels, ks=(1, 5)).mean(dim=0) * 100
        loss = nn.functional.cross_entropy(logits, labels).item()
    return {"top1": hits[0].item(), "top5": hits[1].item(), "loss": loss}


def _train_fc(
    cfg: CfgNode, fc: nn.Linear, train: tuple, val: tuple, writer: MetricWriter
) -> tuple[dict, dict]:
    """SGD on the fc over (features, labels) batches, a (SEED, epoch) shuffle per epoch; returns (last, best)."""
    (feats, labels), (val_feats, val_labels) = train, val
    s = cfg.SOLVER
    optimizer = torch.optim.SGD(fc.parameters(), s.BASE_LR, momentum=s.MOMENTUM, weight_decay=s.WEIGHT_DECAY)
    batch, iteration = s.BATCH_SIZE, 0
    best = {"top1": -1.0, "top5": -1.0, "epoch": 0}
    for epoch in range(s.EPOCHS):
        lr = lr_at(cfg, epoch)
        set_lr(optimizer, lr)
        order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(mix_seed(cfg.SEED, epoch)))
        x_epoch, y_epoch = feats[order], labels[order]  # one gather per epoch; batches are views
        sums = torch.zeros(2, dtype=torch.float64)  # loss sum, top-1 hits (no host sync per step)
        for i in range(0, len(order), batch):
            x, y = x_epoch[i : i + batch], y_epoch[i : i + batch]
            logits = fc(x)
            loss = nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            sums += torch.stack([loss.detach() * len(y), (logits.detach().argmax(1) == y).sum()])
        loss_sum, hits = sums.tolist()
        train_scalars = {"loss": loss_sum / len(order), "top1": 100 * hits / len(order), "lr": lr}
        last = _fc_metrics(fc, val_feats, val_labels)
        if last["top1"] > best["top1"]:
            best = {"top1": last["top1"], "top5": last["top5"], "epoch": epoch + 1}
        writer.write(iteration, train_scalars, prefix="train")
        writer.write(iteration, {**last, "epoch": epoch + 1}, prefix="val")
        logger.info(
            "epoch %d/%d: train loss %.4f, val top1 %.3f top5 %.3f (lr %g)",
            epoch + 1, s.EPOCHS, train_scalars["loss"], last["top1"], last["top5"], lr,
        )  # fmt: skip
    return last, best


def train_precomputed(cfg: CfgNode, dist_info: DistInfo) -> dict:
    """The linear protocol's fc trained on features computed once (see TRAIN.PRECOMPUTED_FEATURES).

    Same model, initialisation, optimiser (SGD, momentum, no weight decay), global batch and step
    schedule as :func:`train`; each epoch shuffles the cached training features with a seed of
    (SEED, epoch). Every process trains the same fc on the gathered features, so the result does not
    depend on the process count; the fc takes seconds, so a rerun retrains it rather than resuming.
    """
    out = Path(cfg.OUTPUT_DIR)
    _check_cfg(cfg, dist_info.world_size)
    state = load_pretrained(cfg)
    d = cfg.DATA
    tf = build_eval_transform(d.CROP_SIZE, d.RESIZE, d.MEAN, d.STD)
    datasets = labelled_split_pair(d.ROOT, d.TRAIN_SPLIT, d.VAL_SPLIT, tf, tf, d.MAX_BAD_FRACTION)
    num_classes = _num_classes(cfg, len(datasets[0].classes))
    torch.manual_seed(cfg.SEED)
    model, pretrained, source = build_model(cfg, num_classes, state)
    model.to(dist_info.device)
    cache = _cached_features(cfg, model, datasets, dist_info)
    feats, labels = cache["train"].float(), cache["train_labels"]
    val_feats, val_labels = cache["val"].float(), cache["val_labels"]
    mean, std = torch.zeros(feats.shape[1]), torch.ones(feats.shape[1])
    if cfg.TRAIN.STANDARDIZE_FEATURES:
        mean, std = feats.mean(dim=0), feats.std(dim=0).clamp_min(1e-6)  # constant features stay 0
        feats, val_feats = (feats - mean) / std, (val_feats - mean) / std
    fc = model.fc.cpu()
    writer = MetricWriter(out, enabled=dist_info.is_main, tensorboard=cfg.LOG.TENSORBOARD)
    logger.info(
        "linear probe on precomputed features: %s, %d train / %d val features of dim %d, weights from %s",
        cfg.MODEL.ARCH, len(feats), len(val_feats), feats.shape[1], source,
    )  # fmt: skip
    last, best = _train_fc(cfg, fc, (feats, labels), (val_feats, val_labels), writer)
    writer.close()
    with torch.no_grad():  # fold the standardisation into the fc: a plain classifier on raw features
        fc.weight.div_(std)
        fc.bias.sub_(fc.weight @ mean)
    model.fc.to(dist_info.device)
    if pretrained is not None:
        sanity_check(model, pretrained)
    standardised = ", standardised" if cfg.TRAIN.STANDARDIZE_FEATURES else ""
    results = _results(
        cfg, last, best, "lincls", num_classes, len(val_feats),
        features="precomputed once (validation transform, no crop augmentation)" + standardised,
        num_skipped=len(cache["skipped"]), sanity_check="passed",
    )  # fmt: skip
    if dist_info.is_main:
        ckpt = _checkpoint(cfg, model, None, cfg.SOLVER.EPOCHS, best, "lincls")
        save_atomic(ckpt, out / "model_final.pth")
        write_json_atomic(results, out / "results.json")
        logger.info("results: %s", json.dumps(results))
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = default_argument_parser("Linear classification / supervised training of a ResNet").parse_args(argv)
    cfg = load_config(lincls_defaults(), args.config_file, args.opts)
    dist_info = init_distributed(cfg.TRAIN.DEVICE)
    setup_logging(cfg.OUTPUT_DIR, dist_info.rank)
    try:
        return (train_precomputed if cfg.TRAIN.PRECOMPUTED_FEATURES else train)(cfg, dist_info)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
