"""MoCo: momentum contrast (He et al. 2020; Chen et al. 2020 for v2), the whole algorithm in one module.

State-dict names follow the official implementation (``encoder_q.*``, ``encoder_k.*``, ``queue``,
``queue_ptr``; the v2 MLP head is ``fc.0``/``fc.2``) so official checkpoints load here unchanged.

Shuffle-BN works on ``world_size x bn_splits`` batch-norm groups: across processes exactly as the paper
(gather the key images, draw a permutation on rank 0, broadcast it, forward the local slice, gather the
keys, unshuffle), and inside each process by splitting the local batch into ``bn_splits`` contiguous
sub-batches with their own BN statistics (:class:`SplitBatchNorm2d`). One process with ``bn_splits=N``
computes exactly what N processes with ``bn_splits=1`` compute for the same permutation.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moco_d2.core import distributed as dist_utils
from moco_d2.core.backbone import PRETRAIN_ARCHS as RESNET_ARCHS
from moco_d2.core.backbone import build_resnet
from moco_d2.evaluation.features import topk_correct


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are computed over ``num_splits`` contiguous sub-batches.

    Emulates ``num_splits`` devices on one: sub-batch ``i`` is normalised exactly as a device holding
    only that slice would normalise it. Running statistics get the mean of the sub-batch statistics.
    A subclass of ``nn.BatchNorm2d`` so parameter/buffer names and eval behaviour are unchanged.

    Training mode is one ``F.batch_norm`` call whatever ``num_splits`` (the splits become extra channels),
    at the cost of two regrouping copies forward and two backward. Measured on a loaded 2-core CPU
    (ResNet-18 BN shapes, batch 256, 8 splits): NCHW on par with a per-split loop; channels_last about 2x
    slower than the loop on the largest map (256x64x16x16), on par on small ones.
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        s = self.num_splits
        n, c = x.shape[:2]
        if n % s != 0:
            raise ValueError(f"batch of {n} is not divisible into {s} batch-norm splits")
        factor = 0.0
        means = variances = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            # One private copy of the running stats per split (split-major, like the channels below);
            # F.batch_norm updates them in place.
            means = self.running_mean.repeat(s)
            variances = self.running_var.repeat(s)
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        # Split i (rows i*n/s .. (i+1)*n/s - 1) becomes channels i*c .. (i+1)*c - 1 of an n/s-sample batch:
        # one batch_norm call normalises every split over its own rows, whatever the number of splits.
        spatial = x.shape[2:]
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # NHWC memory: move the split axis next to C so that both copies stay NHWC and the output
            # has the input's memory format, as the per-split batch norms concatenated had.
            nhwc = x.permute(0, 2, 3, 1).reshape(s, n // s, *spatial, c).movedim(0, -2)
            grouped = nhwc.reshape(n // s, *spatial, s * c).permute(0, 3, 1, 2)
            y = F.batch_norm(grouped, means, variances, weight, bias, True, factor, self.eps)
            y = y.permute(0, 2, 3, 1).reshape(n // s, *spatial, s, c).movedim(-2, 0)
            out = y.reshape(n, *spatial, c).permute(0, 3, 1, 2)
        else:
            grouped = x.reshape(s, n // s, c, *spatial).transpose(0, 1).reshape(n // s, s * c, *spatial)
            y = F.batch_norm(grouped, means, variances, weight, bias, True, factor, self.eps)
            out = y.reshape(n // s, s, c, *spatial).transpose(0, 1).reshape(n, c, *spatial)
        if self.track_running_stats:
            self.running_mean.copy_(means.view(s, c).mean(0))
            self.running_var.copy_(variances.view(s, c).mean(0))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def build_encoder(arch: str, dim: int, mlp: bool, bn_splits: int = 1) -> nn.Module:
    """A torchvision-layout ResNet of the architecture table whose ``fc`` outputs ``dim`` features, with the v2 MLP head if ``mlp``."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(RESNET_ARCHS)}")
    norm_layer = partial(SplitBatchNorm2d, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    encoder = build_resnet(arch, weights=None, num_classes=dim, norm_layer=norm_layer)
    if mlp:
        hidden = encoder.fc.weight.shape[1]  # the encoder's feature width (2048 for resnet50)
        encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
    return encoder


def contrastive_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """InfoNCE logits ``[q.k+, q.queue] / T`` (N x (1+K)); the positive is at index 0.

    Always at least fp32, whatever autocast is active: half-precision inputs are cast up and autocast is
    disabled here (bf16 einsums would round the similarities to ~3 significant digits).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, queue = _at_least_fp32(q), _at_least_fp32(k), _at_least_fp32(queue)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, queue)
        return torch.cat([l_pos, l_neg], dim=1) / T


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Percentage of rows whose target is among the top-k logits, one entry per k (no host sync)."""
    return topk_correct(logits, target, ks).mean(dim=0) * 100.0


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 cast up to fp32; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _normalize_fp32(features: torch.Tensor) -> torch.Tensor:
    """Unit-norm rows, computed in (at least) fp32 outside autocast: encoder features may leave a bf16
    autocast region in bf16, but normalisation, logits, loss and the queue are full precision."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.normalize(_at_least_fp32(features), dim=1)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of negative keys."""

    def __init__(
        self,
        arch: str = "resnet50",
        dim: int = 128,
        K: int = 65536,
        m: float = 0.999,
        T: float = 0.2,
        mlp: bool = True,
        bn_splits: int = 1,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__()
        self.arch, self.K, self.m, self.T = arch, K, m, T
        self.shuffle_bn = shuffle_bn
        self.encoder_q = build_encoder(arch, dim, mlp, bn_splits)
        self.encoder_k = build_encoder(arch, dim, mlp, bn_splits)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # the key encoder starts as a copy of the query encoder
            param_k.requires_grad = False  # and is never updated by gradients
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def compile_encoders(self, **options) -> None:
        """``torch.compile`` both encoders in place (``nn.Module.compile``: parameter and state-dict names
        stay the same). The queue, shuffle-BN and loss stay eager: they are a few cheap ops."""
        self.encoder_q.compile(**options)
        self.encoder_k.compile(**options)

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        """key = m * key + (1 - m) * query, over all parameters (buffers such as BN stats are not)."""
        params_k = list(self.encoder_k.parameters())
        params_q = list(self.encoder_q.parameters())
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` queue entries with ``keys`` (the whole global batch).

        No host sync: the pointer stays on the device and the columns are written with ``index_copy_``
        (what the official ``queue[:, ptr : ptr + B] = keys.T`` writes, since ``K % B == 0``).
        """
        batch_size = keys.shape[0]
        if self.K % batch_size != 0:
            raise ValueError(f"queue size K={self.K} is not a multiple of the global batch {batch_size}")
        columns = (torch.arange(batch_size, device=self.queue_ptr.device) + self.queue_ptr) % self.K
        self.queue.index_copy_(1, columns, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(batch_size).remainder_(self.K)

    @torch.no_grad()
    def _batch_shuffle(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the global key batch, permute it (permutation drawn on rank 0), return this rank's slice."""
        x_all = dist_utils.all_gather_cat(x)
        n = x_all.shape[0]
        if dist_utils.get_rank() == 0:
            # drawn on the host from the CPU generator (the seeded stream); the copy does not wait for the device
            idx_shuffle = torch.randperm(n, generator=generator).to(x.device, non_blocking=True)
        else:
            idx_shuffle = torch.empty(n, dtype=torch.long, device=x.device)
        dist_utils.broadcast_(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        local = idx_shuffle.view(dist_utils.get_world_size(), -1)[dist_utils.get_rank()]
        out = x_all[local]
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out, idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`_batch_shuffle`: gather the keys and take back this rank's original samples."""
        x_all = dist_utils.all_gather_cat(x)
        local = idx_unshuffle.view(dist_utils.get_world_size(), -1)[dist_utils.get_rank()]
        return x_all[local]

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return InfoNCE logits (N x (1+K)) and their targets (zeros), then enqueue the keys.

        ``generator`` (CPU, used on rank 0) draws the shuffle-BN permutation; pass one seeded per step
        for reproducible runs. The logits use the queue as it was before this batch's keys are enqueued.
        """
        q = _normalize_fp32(self.encoder_q(im_q))
        with torch.no_grad():
            self._momentum_update_key_encoder()  # before the key forward, as the official code
            if self.shuffle_bn:
                im_k, idx_unshuffle = self._batch_shuffle(im_k, generator)
            k = _normalize_fp32(self.encoder_k(im_k))
            if self.shuffle_bn:
                k = self._batch_unshuffle(k, idx_unshuffle)
        logits = contrastive_logits(q, k, self.queue.clone().detach(), self.T)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(dist_utils.all_gather_cat(k))
        return logits, labels
