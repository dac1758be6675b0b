"""MoCo module: momentum update, queue, InfoNCE logits and split BN against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.moco import MoCo, SplitBatchNorm2d, build_encoder, contrastive_logits, topk_accuracy


def tiny_moco(**kw) -> MoCo:
    torch.manual_seed(0)
    args = {"arch": "resnet18", "dim": 8, "K": 16, "m": 0.9, "T": 0.2, "mlp": True, "bn_splits": 2}
    args.update(kw)
    return MoCo(**args)


def test_state_dict_uses_official_names():
    model = tiny_moco()
    keys = set(model.state_dict())
    assert {"queue", "queue_ptr", "encoder_q.conv1.weight", "encoder_k.layer4.1.bn2.running_var"} <= keys
    # v2 MLP head: fc -> hidden (= feature width 512 for resnet18) -> ReLU -> fc dim
    assert model.encoder_q.fc[0].weight.shape == (512, 512)
    assert model.encoder_q.fc[2].weight.shape == (8, 512)
    assert {"encoder_q.fc.0.weight", "encoder_q.fc.2.bias"} <= keys
    v1 = tiny_moco(mlp=False)
    assert v1.encoder_q.fc.weight.shape == (8, 512)
    assert model.queue.shape == (8, 16)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(16))
    assert model.queue_ptr.tolist() == [0]


def test_key_encoder_is_a_frozen_copy():
    model = tiny_moco()
    for (name_q, pq), (name_k, pk) in zip(
        model.encoder_q.named_parameters(), model.encoder_k.named_parameters()
    ):
        assert name_q == name_k
        assert torch.equal(pq, pk)
        assert pq.requires_grad and not pk.requires_grad


def test_momentum_update_all_parameters():
    model = tiny_moco(m=0.75)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q0 = [p.clone() for p in model.encoder_q.parameters()]
    k0 = [p.clone() for p in model.encoder_k.parameters()]
    buffers0 = {n: b.clone() for n, b in model.encoder_k.named_buffers()}
    model._momentum_update_key_encoder()
    for pq, pk, q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), q0, k0):
        torch.testing.assert_close(pk, 0.75 * k + 0.25 * q, rtol=0, atol=1e-6)
        assert torch.equal(pq, q)
    for n, b in model.encoder_k.named_buffers():
        assert torch.equal(b, buffers0[n])


def test_queue_enqueue_and_wraparound():
    model = tiny_moco(dim=2, K=6)
    old = model.queue.clone()
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    model._dequeue_and_enqueue(a)
    assert model.queue_ptr.item() == 2
    assert torch.equal(model.queue[:, :2], a.T) and torch.equal(model.queue[:, 2:], old[:, 2:])
    b = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    c = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    model._dequeue_and_enqueue(b)
    model._dequeue_and_enqueue(c)
    assert model.queue_ptr.item() == 0  # wrapped around
    assert torch.equal(model.queue, torch.cat([a, b, c]).T)
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    model._dequeue_and_enqueue(d)  # replaces the oldest entries (a)
    assert model.queue_ptr.item() == 2
    assert torch.equal(model.queue, torch.cat([d, b, c]).T)
    with pytest.raises(ValueError, match="multiple"):
        model._dequeue_and_enqueue(torch.zeros(4, 2))


def test_contrastive_logits_and_loss_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]])  # 3 keys as columns
    logits = contrastive_logits(q, k, queue, T=0.5)
    expected = torch.tensor([[0.6, 1.0, 0.0, -1.0], [1.0, 0.0, 0.5, 0.0]]) / 0.5
    torch.testing.assert_close(logits, expected)
    loss = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    row0 = -1.2 + math.log(math.exp(1.2) + math.exp(2.0) + 1.0 + math.exp(-2.0))
    row1 = -2.0 + math.log(math.exp(2.0) + 1.0 + math.exp(1.0) + 1.0)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    # positive at index 0: ranked first in row 1, second in row 0
    assert topk_accuracy(logits, torch.zeros(2, dtype=torch.long), ks=(1, 2)).tolist() == [50.0, 100.0]


def test_split_batchnorm_matches_per_chunk_batchnorm():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    split = SplitBatchNorm2d(3, num_splits=3)
    with torch.no_grad():
        split.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        split.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    plain = [nn.BatchNorm2d(3) for _ in range(3)]
    for bn in plain:
        bn.load_state_dict(split.state_dict())
    out = split(x)
    ref = torch.cat([bn(c) for bn, c in zip(plain, x.chunk(3))])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(split.running_mean, torch.stack([bn.running_mean for bn in plain]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([bn.running_var for bn in plain]).mean(0))
    assert split.num_batches_tracked.item() == 1
    split.eval()
    torch.testing.assert_close(
        split(x), F.batch_norm(x, split.running_mean, split.running_var, split.weight, split.bias)
    )
    with pytest.raises(ValueError, match="divisible"):
        split.train()(torch.randn(4, 3, 2, 2))


def test_encoder_uses_split_bn_only_when_asked():
    assert isinstance(build_encoder("resnet18", 8, False, bn_splits=4).bn1, SplitBatchNorm2d)
    assert type(build_encoder("resnet18", 8, False, bn_splits=1).bn1) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="unknown arch"):
        build_encoder("vgg16", 8, False)


def test_forward_momentum_before_keys_shuffle_and_enqueue():
    model = tiny_moco(K=8, m=0.5)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(0.1 * torch.randn_like(p))  # make the key encoder differ from its update
    im_q, im_k = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    queue0 = model.queue.clone()
    logits, labels = model(im_q, im_k, generator=torch.Generator().manual_seed(7))
    assert logits.shape == (4, 9) and labels.tolist() == [0, 0, 0, 0]
    # recompute the keys by hand: momentum-updated key encoder on the shuffled batch, then unshuffle
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        k = F.normalize(model.encoder_k(im_k[perm]), dim=1)[torch.argsort(perm)]
        q = F.normalize(model.encoder_q(im_q), dim=1)
    torch.testing.assert_close(model.queue[:, :4], k.T)
    assert torch.equal(model.queue[:, 4:], queue0[:, 4:])
    assert model.queue_ptr.item() == 4
    torch.testing.assert_close(logits, contrastive_logits(q, k, queue0, 0.2), rtol=1e-5, atol=1e-5)
    # gradients reach only the query encoder
    F.cross_entropy(logits, labels).backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())


@pytest.fixture
def uncached_inductor():
    """Generate inductor's kernels afresh instead of loading them from its on-disk graph caches.

    torch/inductor bug (torch 2.14), not ours: the FX-graph and AOT-autograd cache keys leave out the
    vector ISA the C++ kernels are generated for. A graph generated under the native ISA (AVX-512 here:
    float64 loops of 16 lanes, ``VectorizedN<double, 2>``) is served from the cache to a process running
    with ``ATEN_CPU_CAPABILITY=avx2``, where that source is compiled with AVX2 flags (8 lanes): half of each
    reduction is skipped and uninitialised memory is read, so running stats hold garbage and the loss is
    NaN. Smallest reproduction, one shared ``TORCHINDUCTOR_CACHE_DIR``: run
    ``torch.compile(lambda x: x.sum(0))(torch.randn(64, 40, dtype=torch.float64))`` once natively, then
    again under ``ATEN_CPU_CAPABILITY=avx2``: wrong by ~18. A fresh cache, ``cpp.simdlen=1`` or no cache
    hit all give the right answer. The C++ build cache stays on (keyed by source and flags, so correct)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def test_compiled_encoders_compute_the_same_steps(one_thread, uncached_inductor, monkeypatch):
    """TRAIN.COMPILE: same state-dict names, same losses, same momentum-updated key encoder and queue.

    In float64: in float32 the fused kernels' different rounding is amplified by the 4-image BN groups
    (~1e-3 after one update), which would hide a real difference behind a loose tolerance.
    Compiled with TRAIN.COMPILE_MODE "reduce-overhead" (what GPUs use for CUDA graphs; on CPU tensors
    inductor skips the graphs and the rest of the mode's pipeline is checked), and the mode is seen to
    reach torch.compile."""
    from pretrain.train import train_step

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = tiny_moco(bn_splits=2).double()
        if compiled:
            seen, real_compile = [], torch.compile

            def recording_compile(*args, _seen=seen, _compile=real_compile, **kwargs):
                _seen.append(kwargs)
                return _compile(*args, **kwargs)

            monkeypatch.setattr(torch, "compile", recording_compile)
            model.compile_encoders(mode="reduce-overhead")
            assert [kw.get("mode") for kw in seen] == ["reduce-overhead"] * 2
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for step in range(2):
            im_q, im_k = (
                torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(10 * step + v)).double()
                for v in (1, 2)
            )
            stats = train_step(model, optimizer, im_q, im_k, torch.Generator().manual_seed(step))
            losses.append(stats[0].item())
        runs.append((model, losses))
    (eager, eager_losses), (comp, comp_losses) = runs
    assert list(comp.state_dict()) == list(eager.state_dict())
    assert comp_losses == pytest.approx(eager_losses, abs=1e-9)
    for (name, a), b in zip(eager.state_dict().items(), comp.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9, msg=name)
    assert not torch.equal(eager.encoder_k.conv1.weight, torch.zeros_like(eager.encoder_k.conv1.weight))


def loop_split_batchnorm(bn: SplitBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The reference: one F.batch_norm per contiguous sub-batch (what SplitBatchNorm2d computed before
    it was vectorised), private running-stat copies averaged over the splits."""
    s = bn.num_splits
    factor, means, variances = 0.0, [None] * s, [None] * s
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        means = bn.running_mean.unsqueeze(0).repeat(s, 1)
        variances = bn.running_var.unsqueeze(0).repeat(s, 1)
    outs = [
        F.batch_norm(chunk, means[i], variances[i], bn.weight, bn.bias, True, factor, bn.eps)
        for i, chunk in enumerate(x.chunk(s))
    ]
    if bn.track_running_stats:
        bn.running_mean.copy_(means.mean(0))
        bn.running_var.copy_(variances.mean(0))
    return torch.cat(outs)


def split_bn_pair(
    affine: bool, momentum: float | None, dtype: torch.dtype, channels: int = 3, splits: int = 4
):
    torch.manual_seed(2)
    bn = SplitBatchNorm2d(channels, num_splits=splits, affine=affine, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    ref = SplitBatchNorm2d(channels, num_splits=splits, affine=affine, momentum=momentum).to(dtype)
    ref.load_state_dict(bn.state_dict())
    return bn, ref


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_vectorised_split_batchnorm_equals_the_per_split_loop(one_thread, affine, momentum, channels_last):
    """Float64: outputs, input/weight/bias gradients and running stats over 3 training steps, then eval."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bn, ref = split_bn_pair(affine, momentum, torch.float64)
    for step in range(3):
        x = (torch.randn(8, 3, 5, 4, dtype=torch.float64) * (step + 1) + step).contiguous(memory_format=fmt)
        x_ref = x.detach().clone().requires_grad_()
        x.requires_grad_()
        out, out_ref = bn(x), loop_split_batchnorm(ref, x_ref)
        # same memory format as the concatenated per-split outputs
        assert out.stride() == out_ref.stride() and out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(out)
        out.backward(grad)
        out_ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
        for name, p in bn.named_parameters():
            torch.testing.assert_close(
                p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-12, atol=1e-12
            )
        for name, b in bn.named_buffers():
            torch.testing.assert_close(b, dict(ref.named_buffers())[name], rtol=1e-12, atol=1e-12, msg=name)
    assert bn.num_batches_tracked.item() == 3
    bn.eval()
    x = torch.randn(8, 3, 5, 4, dtype=torch.float64).contiguous(memory_format=fmt)
    torch.testing.assert_close(
        bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias), rtol=0, atol=0
    )


def test_vectorised_split_batchnorm_without_running_stats_and_at_1x1(one_thread):
    """track_running_stats=False (batch statistics only) and layer4's 1x1 maps at 32 px, both formats."""
    for track, size in ((False, 4), (True, 1)):
        bn = SplitBatchNorm2d(6, num_splits=2, track_running_stats=track).double()
        ref = SplitBatchNorm2d(6, num_splits=2, track_running_stats=track).double()
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(8, 6, size, size, dtype=torch.float64).contiguous(memory_format=fmt)
            out, out_ref = bn(x), loop_split_batchnorm(ref, x)
            assert out.is_contiguous(memory_format=fmt) == out_ref.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
        if track:
            torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def test_vectorised_split_batchnorm_fp32_within_rounding(one_thread):
    """fp32: the two reduce the same 2x5x4 = 40 values per (split, channel) in possibly different orders.

    Normalised outputs are O(1) and each of mean, variance and 1/sqrt rounds with relative error
    ~ n * eps (eps = 2**-24, n = 40 summands): |diff| <= a few * 40 * 6e-8 * |x_hat| ~ 1e-5 at |x_hat| ~ 3."""
    bn, ref = split_bn_pair(True, 0.1, torch.float32)
    for _ in range(2):
        x = torch.randn(8, 3, 5, 4) * 3 + 1
        torch.testing.assert_close(bn(x), loop_split_batchnorm(ref, x), rtol=0, atol=2e-5)
        torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


def official_enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, K: int) -> None:
    """The official code's (and our former) slice assignment with the pointer read on the host."""
    p = int(ptr)
    queue[:, p : p + keys.shape[0]] = keys.T
    ptr[0] = (p + keys.shape[0]) % K


@pytest.mark.parametrize("batch", [1, 4, 8, 16])
def test_sync_free_enqueue_is_bit_identical_to_slice_assignment(batch):
    model = tiny_moco(dim=5, K=16)
    queue, ptr = model.queue.clone(), model.queue_ptr.clone()
    for step in range(40 // batch + 3):  # wraps around at least twice
        keys = F.normalize(torch.randn(batch, 5, generator=torch.Generator().manual_seed(step)), dim=1)
        model._dequeue_and_enqueue(keys)
        official_enqueue(queue, ptr, keys, 16)
        assert torch.equal(model.queue, queue) and torch.equal(model.queue_ptr, ptr)
        assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == (1,)
