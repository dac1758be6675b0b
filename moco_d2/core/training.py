"""Training-loop machinery shared by MoCo pretraining and linear classification.

Both loops write the official checkpoint layout (``epoch``, ``arch``, ``state_dict`` with ``module.``
names, ``optimizer``) and refuse to resume from the wrong file in one line; keeping that here means a
checkpoint written by one loop is read the same way by the other and by every converter.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
from fvcore.common.config import CfgNode
from torch import nn

from moco_d2.core.errors import UserError
from moco_d2.core.images import mix_seed
from moco_d2.core.io import load_checkpoint

logger = logging.getLogger("moco")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's lr (the loops compute the schedule per epoch themselves)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def seed_epoch(seed: int, rank: int, epoch: int, generator: torch.Generator) -> None:
    """Seed torch, ``random`` and a loader's generator from (seed, rank, epoch).

    Augmentation randomness then depends only on those three numbers, so a run resumed at an epoch
    boundary repeats what the uninterrupted run would have done (on the CPU, bit for bit).
    """
    value = mix_seed(seed, rank, epoch)
    torch.manual_seed(value)
    random.seed(value)
    generator.manual_seed(value)


def training_checkpoint(
    cfg: CfgNode,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    kind: str,
    to_cpu: bool = False,
    **extras: object,
) -> dict:
    """The official checkpoint dict (``module.``-prefixed state dict, as DDP saves it) plus our extras.

    ``kind`` tells the loops (and ``backbone.extract_resnet_state``) apart; ``to_cpu`` copies tensors to
    the host first (linear classification's files then load anywhere without ``map_location``).
    """
    state_dict = {f"module.{k}": v.detach().cpu() if to_cpu else v for k, v in model.state_dict().items()}
    state: dict = {"epoch": epoch, "arch": cfg.MODEL.ARCH, "state_dict": state_dict}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    state.update(extras)
    state["config"] = cfg.dump()
    state["kind"] = kind
    return state


def load_resume_checkpoint(path: Path, kind: str, arch: str, what: str, official: bool = False) -> dict:
    """Load the checkpoint a run continues from; one-line UserErrors for a file of another run.

    ``official``: the official MoCo code's files (no ``kind``, no ``arch``, maybe no optimizer) are
    accepted; otherwise both must match and the optimizer state must be there.
    """
    ckpt = load_checkpoint(path)
    name = str(path)
    if "state_dict" not in ckpt or "epoch" not in ckpt:
        raise UserError(
            f"RESUME {name!r} is not a {what} training checkpoint (needs 'epoch' and 'state_dict')"
        )
    got_kind, got_arch = (
        ckpt.get("kind", kind if official else None),
        ckpt.get("arch", arch if official else None),
    )
    if got_kind != kind:
        raise UserError(f"RESUME {name!r} is a {got_kind!r} checkpoint, not a {what} one")
    if got_arch != arch:
        raise UserError(f"RESUME {name!r} is a {got_arch} checkpoint but MODEL.ARCH is {arch}")
    if not official and "optimizer" not in ckpt:
        raise UserError(f"RESUME {name!r} has no optimizer state; it cannot continue a {what} run")
    return ckpt


def load_state_checked(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    what: str,
    hint: str,
    may_miss: tuple[str, ...] = (),
) -> None:
    """``module.load_state_dict`` whose every mismatch is a one-line UserError naming ``what``.

    Shapes are compared first (torch's own error is a page long); keys starting with ``may_miss``
    (e.g. a new classifier ``fc.``) may be absent from ``state_dict``. ``hint`` says which setting to check.
    """
    own = module.state_dict()
    for k, v in state_dict.items():
        if k in own and v.shape != own[k].shape:
            raise UserError(
                f"{what}: {k} has shape {tuple(v.shape)}, the model has {tuple(own[k].shape)} (check {hint})"
            )
    missing = sorted(k for k in set(own) - set(state_dict) if not k.startswith(may_miss))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise UserError(
            f"{what} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
            f"({len(missing)} missing, {len(unexpected)} unexpected; check {hint})"
        )
    module.load_state_dict(state_dict, strict=not may_miss)


def restore_optimizer(optimizer: torch.optim.Optimizer, ckpt: dict, name: str) -> None:
    """Load ``ckpt``'s optimizer state (one-line UserError if it does not fit); warn when it has none."""
    if "optimizer" not in ckpt:
        logger.warning("RESUME %s has no optimizer state; SGD momentum restarts from zero", name)
        return
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"RESUME {name!r}: optimizer state does not match the model ({exc})") from None
