"""Under mixed precision (TRAIN.AMP) the similarities, logits, loss and queue stay fp32 (issue 14).

CPU bf16 autocast stands in for the CUDA one: both run matmul/einsum in bf16 and leave ``cross_entropy``
in fp32, which is what made the logits bf16 before the builder disabled autocast around them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.moco import MoCo, contrastive_logits


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_contrastive_logits_are_fp32_under_autocast(one_thread):
    torch.manual_seed(0)
    q = F.normalize(torch.randn(16, 128), dim=1)
    k = F.normalize(torch.randn(16, 128), dim=1)
    queue = F.normalize(torch.randn(128, 512), dim=0)
    reference = contrastive_logits(q, k, queue, 0.2)  # no autocast: plain fp32
    with bf16_autocast():
        logits = contrastive_logits(q, k, queue, 0.2)
        # bf16 features (what an encoder returns under autocast) are cast up, not the other way round
        from_bf16 = contrastive_logits(q.bfloat16(), k.bfloat16(), queue, 0.2)
    assert logits.dtype == torch.float32 and from_bf16.dtype == torch.float32
    # same kernels on the same fp32 inputs: identical, not merely close
    assert torch.equal(logits, reference)
    assert torch.equal(from_bf16, contrastive_logits(q.bfloat16().float(), k.bfloat16().float(), queue, 0.2))


@pytest.mark.parametrize("bn_splits", [1, 2])
def test_moco_forward_under_autocast_keeps_logits_loss_and_queue_fp32(one_thread, bn_splits):
    torch.manual_seed(0)
    model = MoCo(arch="resnet18", dim=16, K=32, m=0.9, T=0.2, mlp=True, bn_splits=bn_splits)
    im_q, im_k = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    queue0 = model.queue.clone()
    features = {}
    for name in ("encoder_q", "encoder_k"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: features.__setitem__(name, o))
    with bf16_autocast():
        logits, labels = model(im_q, im_k, generator=torch.Generator().manual_seed(3))
        loss = F.cross_entropy(logits, labels)
    assert features["encoder_q"].dtype == torch.bfloat16  # the encoders do run in bf16
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    assert model.queue.dtype == torch.float32
    # an fp32 computation from the same (bf16) features gives exactly these logits and keys
    q = F.normalize(features["encoder_q"].float(), dim=1)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    k = F.normalize(features["encoder_k"].float(), dim=1)[torch.argsort(perm)]
    assert torch.equal(logits, contrastive_logits(q, k, queue0, 0.2))
    assert torch.equal(model.queue[:, :8], k.T) and torch.equal(model.queue[:, 8:], queue0[:, 8:])
    # the enqueued keys are unit vectors to fp32 precision, not to bf16's ~4e-3
    torch.testing.assert_close(model.queue[:, :8].norm(dim=0), torch.ones(8), rtol=0, atol=1e-6)
    assert torch.equal(loss, F.cross_entropy(contrastive_logits(q, k, queue0, 0.2), labels))
    loss.backward()
    assert model.encoder_q.fc[2].weight.grad.dtype == torch.float32
