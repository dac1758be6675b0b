"""Process-group setup and the few collectives MoCo needs, usable with or without ``torchrun``.

A single process (no ``WORLD_SIZE`` in the environment) runs with every collective reduced to the
identity, so the same training code serves one CPU, one GPU, eight GPUs and many nodes.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moco_d2.core.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> DistInfo:
    """Join the process group described by torchrun's environment (env://), if there is one.

    ``device``: "auto" picks CUDA when available; NCCL goes with CUDA, gloo with the CPU.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"TRAIN.DEVICE must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("TRAIN.DEVICE is 'cuda' but no CUDA GPU is available here; use 'cpu' or 'auto'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=get_rank(), world_size=get_world_size(), local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order). No gradient flows back.

    All ranks must pass tensors of the same shape.
    """
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank ends with rank ``src``'s values."""
    if is_dist():
        dist.broadcast(tensor, src)
    return tensor


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new tensor); the identity for one process."""
    return all_reduce_sum(tensor) / get_world_size() if is_dist() else tensor


@torch.no_grad()
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor); the identity for one process."""
    if not is_dist():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out


def wrap_ddp(model: nn.Module, device: torch.device, sync_buffers: bool = True) -> DistributedDataParallel:
    """DDP averaging ``model``'s gradients over processes; ``sync_buffers=False`` skips the per-step
    broadcast of rank 0's buffers (its keyword is ``forward_sync_buffers`` from torch 2.14 on)."""
    ids = [device.index] if device.type == "cuda" else None
    if sync_buffers:
        return DistributedDataParallel(model, device_ids=ids)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a cluster signals every process of a job; the trainer stops cleanly
    and shuts its workers down itself, so they must not die first.

    They ignore SIGTERM, so whoever starts them must end them on an error with :func:`kill_workers`
    (multiprocessing's exit handler would SIGTERM them and wait forever); on Linux they also get
    SIGKILL as soon as their parent dies.
    """
    for sig in StopSignals.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the DataLoader's own watchdog still notices
        pass
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


def kill_workers(timeout: float = 10.0) -> None:
    """SIGKILL this process's multiprocessing children (loader workers) and reap them.

    For the error path of a process whose workers ignore SIGTERM (:func:`ignore_stop_signals`): without
    it, the interpreter's exit handler terminates them with SIGTERM and joins them forever.
    """
    children = multiprocessing.active_children()
    if not children:
        return
    if threading.current_thread() is threading.main_thread():
        # The DataLoader's SIGCHLD handler would turn the killed workers into a second error.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            child.kill()
    for child in children:
        with contextlib.suppress(OSError, ValueError, AssertionError):
            child.join(timeout)


class StopSignals:
    """SIGTERM / SIGUSR1 (a cluster's preemption notice, torchrun shutting down) become a clean stop.

    The handler only records the signal; the training loop asks :meth:`agreed` at step boundaries, which
    is True on every rank as soon as any rank got a signal, so all ranks stop after the same iteration
    and the checkpoint they write is consistent. A context manager: the previous handlers come back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (a collective: call it on every rank alike)."""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
