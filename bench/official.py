"""The official MoCo code's arithmetic, as the benchmarks' baseline (issue 17).

``OfficialMoCo`` is facebookresearch/moco ``moco/builder.py`` with its cross-GPU gathers reduced to one
process (``concat_all_gather`` of one rank is the identity; ``_batch_shuffle_ddp`` then draws a
``torch.randperm`` on the global RNG and indexes, as it does on rank 0). ``OfficialSplitBatchNorm`` is
the split BN of the official CIFAR-10 Colab demo (``colab/moco_cifar10_demo.ipynb``), which emulates
``num_splits`` GPUs in one process by viewing the batch as ``num_splits`` times the channels (a free
view: no copies, samples ``i, i+s, i+2s, ...`` form split ``i``). ``official_step`` is the body of
``main_moco.py``'s ``train()`` loop; ``official_optimizer`` its SGD construction (torch's defaults:
``foreach`` where torch picks it, i.e. on CUDA).
"""

from __future__ import annotations

from functools import partial

import torch
import torchvision
from torch import nn


class OfficialSplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kw) -> None:
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        N, C, H, W = input.shape
        if self.training or not self.track_running_stats:
            running_mean_split = self.running_mean.repeat(self.num_splits)
            running_var_split = self.running_var.repeat(self.num_splits)
            outcome = nn.functional.batch_norm(
                input.view(-1, C * self.num_splits, H, W),
                running_mean_split,
                running_var_split,
                self.weight.repeat(self.num_splits),
                self.bias.repeat(self.num_splits),
                True,
                self.momentum,
                self.eps,
            ).view(N, C, H, W)
            self.running_mean.data.copy_(running_mean_split.view(self.num_splits, C).mean(dim=0))
            self.running_var.data.copy_(running_var_split.view(self.num_splits, C).mean(dim=0))
            return outcome
        return nn.functional.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, self.momentum, self.eps
        )


class OfficialMoCo(nn.Module):
    """``moco.builder.MoCo`` (v2: ``mlp=True``) on one process."""

    def __init__(self, arch: str, dim=128, K=65536, m=0.999, T=0.2, mlp=True, bn_splits: int = 1) -> None:
        super().__init__()
        self.K, self.m, self.T = K, m, T
        norm = partial(OfficialSplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
        base_encoder = getattr(torchvision.models, arch)
        self.encoder_q = base_encoder(num_classes=dim, norm_layer=norm)
        self.encoder_k = base_encoder(num_classes=dim, norm_layer=norm)
        if mlp:
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = nn.functional.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x):
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        return x[idx_shuffle], torch.argsort(idx_shuffle)

    def forward(self, im_q, im_k):
        q = nn.functional.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = nn.functional.normalize(self.encoder_k(im_k), dim=1)
            k = k[idx_unshuffle]
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def official_optimizer(model: nn.Module, lr: float = 0.03) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)


def accuracy(output, target, topk=(1,)):
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size) for k in topk]


def official_step(model, optimizer, images: list[torch.Tensor], device: torch.device) -> float:
    """One iteration of ``main_moco.py``'s loop: non-blocking copies, forward, loss, accuracy, update."""
    if device.type == "cuda":
        images[0] = images[0].cuda(device, non_blocking=True)
        images[1] = images[1].cuda(device, non_blocking=True)
    output, target = model(im_q=images[0], im_k=images[1])
    loss = nn.functional.cross_entropy(output, target)
    accuracy(output, target, topk=(1, 5))
    value = loss.item()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return value
