"""Issue 14: ``AUG.IMPL reference TRAIN.AMP False TRAIN.CHANNELS_LAST False SOLVER.FOREACH False`` builds
exactly the official pieces (facebookresearch/moco ``main_moco.py`` + ``moco/builder.py`` + ``moco/loader.py``)
and one training step equals an in-test re-implementation of the official step in float64."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
from torch import nn
from torchvision import transforms

from moco_d2.core.config import load_config, pretrain_defaults
from moco_d2.core.errors import UserError
from pretrain.augment import build_pretrain_transform
from pretrain.train import amp_dtype_for, build_model, build_optimizer, check_config, train_step

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "moco_v2_200ep.yaml"
OFFICIAL = [
    "AUG.IMPL",
    "reference",
    "TRAIN.AMP",
    "False",
    "TRAIN.CHANNELS_LAST",
    "False",
    "SOLVER.FOREACH",
    "False",
]


class OfficialGaussianBlur:
    """moco/loader.py GaussianBlur, verbatim in behaviour."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


def official_aug_plus() -> transforms.Compose:
    """main_moco.py's ``augmentation`` list for ``--aug-plus``."""
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(224, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # not strengthened
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([OfficialGaussianBlur([0.1, 2.0])], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )


def official_cfg(*extra: str):
    return load_config(pretrain_defaults(), str(CONFIG), [*OFFICIAL, *extra])


def test_official_overrides_build_the_official_transform_and_optimizer():
    cfg = official_cfg()
    ours = build_pretrain_transform(cfg.AUG).base_transform
    official = official_aug_plus()
    assert [type(t).__name__ for t in ours.transforms] == [type(t).__name__ for t in official.transforms]
    skip = ("transforms",)  # RandomApply's inner list: compared op by op below
    for a, b in zip(ours.transforms, official.transforms):
        assert {k: v for k, v in vars(a).items() if k not in skip} == {
            k: v for k, v in vars(b).items() if k not in skip
        }
    # and the same pixels for the same seeds, blur included
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 260, 3), dtype=np.uint8))
    for seed in range(8):
        outs = []
        for t in (ours, official):
            random.seed(seed)
            torch.manual_seed(seed)
            outs.append(t(img))
        assert torch.equal(*outs)
    assert amp_dtype_for(cfg, torch.device("cuda")) is None  # no autocast on any device
    assert not cfg.TRAIN.CHANNELS_LAST and not cfg.TRAIN.COMPILE
    opt = build_optimizer(cfg, build_model(cfg.clone(), 8), torch.device("cuda"))
    (group,) = opt.param_groups
    assert type(opt) is torch.optim.SGD
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.03, 0.9, 1e-4)  # batch 256
    assert (group["dampening"], group["nesterov"]) == (0, False)
    assert not group["foreach"] and not group["fused"]  # the per-parameter loop, as torch 1.x SGD
    m = cfg.MODEL
    assert (m.K, m.M, m.T, m.MLP, m.DIM, cfg.SOLVER.SCHEDULE, cfg.SOLVER.EPOCHS) == (
        65536, 0.999, 0.2, True, 128, "cosine", 200
    )  # fmt: skip


def test_compile_mode_is_checked():
    cfg = official_cfg("TRAIN.COMPILE_MODE", "reduce-overhead")
    check_config(cfg, 8)
    with pytest.raises(UserError, match="TRAIN.COMPILE_MODE"):
        check_config(official_cfg("TRAIN.COMPILE_MODE", "fast"), 8)


def official_encoder(dim: int) -> nn.Module:
    """builder.py: ``base_encoder(num_classes=dim)`` with the MLP head, plain BN (one per GPU)."""
    enc = torchvision.models.resnet18(num_classes=dim)
    hidden = enc.fc.weight.shape[1]
    enc.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), enc.fc)
    return enc


def official_step(state: dict, im_q, im_k, perm, gpus: int, m: float, T: float, K: int, lr: float):
    """One main_moco.py iteration on ``gpus`` emulated GPUs (DDP: gradient = mean over GPUs; per-GPU BN;
    Shuffle-BN with the permutation ``perm`` drawn on rank 0). Returns the mean loss; updates ``state``."""
    enc_q, enc_k, queue, ptr, opt = state["q"], state["k"], state["queue"], state["ptr"], state["opt"]
    n = im_q.shape[0]
    qs = [F.normalize(enc_q(c), dim=1) for c in im_q.chunk(gpus)]
    with torch.no_grad():
        for pq, pk in zip(enc_q.parameters(), enc_k.parameters()):
            pk.data = pk.data * m + pq.data * (1.0 - m)
        shuffled = im_k[perm]  # concat_all_gather, then rank g takes idx_shuffle.view(gpus, -1)[g]
        ks = torch.cat([F.normalize(enc_k(c), dim=1) for c in shuffled.chunk(gpus)])
        k_all = ks[torch.argsort(perm)]
    losses = []
    for q, k in zip(qs, k_all.chunk(gpus)):
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / T
        losses.append(F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long)))
    loss = torch.stack(losses).mean()  # DDP averages the per-GPU gradients
    with torch.no_grad():
        p = int(ptr)
        queue[:, p : p + n] = k_all.T
        ptr[0] = (p + n) % K
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_one_step_equals_the_official_step_in_float64(one_thread):
    gpus, batch = 2, 8
    cfg = official_cfg(
        "MODEL.ARCH", "resnet18", "MODEL.DIM", "8", "MODEL.K", "32", "MODEL.BN_SPLITS", str(gpus),
        "SOLVER.BATCH_SIZE", str(batch), "TRAIN.DEVICE", "cpu",
    )  # fmt: skip
    check_config(cfg, 1)
    torch.manual_seed(0)
    ours = build_model(cfg, 1).double()
    opt = build_optimizer(cfg, ours, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    enc_q, enc_k = official_encoder(8).double(), official_encoder(8).double()
    plain = ours.state_dict()
    enc_q.load_state_dict({k[len("encoder_q.") :]: v for k, v in plain.items() if k.startswith("encoder_q.")})
    enc_k.load_state_dict({k[len("encoder_k.") :]: v for k, v in plain.items() if k.startswith("encoder_k.")})
    for p in enc_k.parameters():
        p.requires_grad = False
    official_opt = torch.optim.SGD(
        enc_q.parameters(), lr, momentum=0.9, weight_decay=1e-4
    )  # the key encoder has no gradients: SGD skips it, as over model.parameters()
    state = {
        "q": enc_q, "k": enc_k, "queue": ours.queue.clone(), "ptr": ours.queue_ptr.clone(), "opt": official_opt,
    }  # fmt: skip
    amp = amp_dtype_for(cfg, torch.device("cpu"))
    for step in range(2):
        g = partial(torch.Generator().manual_seed, 100 + step)
        im_q, im_k = (torch.randn(batch, 3, 32, 32, generator=g()).double() for _ in range(2))
        im_k = im_k.flip(0) + 0.1
        perm = torch.randperm(batch, generator=g())
        ref_loss = official_step(state, im_q, im_k, perm, gpus, cfg.MODEL.M, cfg.MODEL.T, cfg.MODEL.K, lr)
        stats = train_step(ours, opt, im_q, im_k, g(), amp_dtype=amp)
        assert stats[0].item() == pytest.approx(ref_loss, rel=1e-7)  # train_step reports the loss in fp32
    for name, p in ours.encoder_q.named_parameters():
        torch.testing.assert_close(p, dict(enc_q.named_parameters())[name], atol=1e-12, rtol=0, msg=name)
    for name, p in ours.encoder_k.named_parameters():
        torch.testing.assert_close(p, dict(enc_k.named_parameters())[name], atol=1e-12, rtol=0, msg=name)
    torch.testing.assert_close(ours.queue, state["queue"], atol=1e-12, rtol=0)
    assert torch.equal(ours.queue_ptr, state["ptr"])
    # Known, documented difference: running BN statistics are the mean over the emulated GPUs (the
    # official checkpoint keeps rank 0's); they do not enter a training step.
