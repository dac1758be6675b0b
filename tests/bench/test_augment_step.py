"""The benchmarked fast training-step settings compute the same MoCo step as the fp32 NCHW baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.bench_step import BASELINE, StepMode, build, cpu_variants, our_mode, step

CPU = torch.device("cpu")


def losses(
    mode: StepMode, steps: int = 2, dtype: torch.dtype = torch.float64
) -> tuple[list[float], torch.Tensor]:
    """Losses of ``steps`` steps from the same weights, inputs and shuffle permutations; final fc weight.

    float64 by default: the claim is that the settings compute the same step, so the comparison must not
    depend on which float32 kernels (AVX-512, AVX2, oneDNN's NHWC ones) a CPU happens to pick.
    """
    model, optimizer = build("resnet18", 32, CPU, mode, seed=0)
    model.to(dtype)
    g = torch.Generator().manual_seed(0)
    im_q = torch.randn(4, 3, 32, 32, generator=g, dtype=dtype)
    im_k = torch.randn(4, 3, 32, 32, generator=g, dtype=dtype)
    out = [
        float(step(model, optimizer, im_q, im_k, CPU, mode, torch.Generator().manual_seed(i)))
        for i in range(steps)
    ]
    return out, model.encoder_q.fc[2].weight.detach().clone()


@pytest.fixture(scope="module")
def baseline():
    return losses(BASELINE), losses(BASELINE, steps=1, dtype=torch.float32)[0]


@pytest.mark.parametrize(
    "mode",
    [
        our_mode(CPU, "resnet18", 32),  # the trainer's CPU settings at this shape: fp32 on every CPU
        *cpu_variants(our_mode(CPU, "resnet18", 32), bf16=False, channels_last=True),
        dataclasses.replace(BASELINE, name="fused SGD", optimizer_impl="fused"),
    ],
    ids=lambda m: m.name,
)
def test_fp32_fast_settings_match_baseline(baseline, mode):
    (ref_losses, ref_w), _ = baseline
    got_losses, got_w = losses(mode)
    # float64 weights and activations differ only by summation order (~1e-15 relative); the loss is
    # reported through float32 logits (cross_entropy(logits.float())), so it may differ by one float32
    # rounding of a logit: |dloss| <= 2^-23 * |logit| / T-scale ~ 1e-6.
    assert got_losses == pytest.approx(ref_losses, rel=2e-6)
    torch.testing.assert_close(got_w, ref_w, atol=1e-10, rtol=1e-10)


def test_bf16_autocast_matches_baseline_within_bf16_precision(baseline):
    mode = dataclasses.replace(our_mode(torch.device("cuda")), pinned_non_blocking=False)  # the CUDA defaults
    got_losses, _ = losses(mode, steps=1, dtype=torch.float32)
    # bf16 keeps 8 mantissa bits; through 18 layers and logits / T (T=0.2) a few % is its precision
    assert got_losses[0] == pytest.approx(baseline[1][0], rel=5e-2)
