"""The benchmarked fast training-step settings compute the same MoCo step as the fp32 NCHW baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.bench_step import BASELINE, StepMode, build, our_mode, step

CPU = torch.device("cpu")


def losses(mode: StepMode, steps: int = 2) -> tuple[list[float], torch.Tensor]:
    """Losses of ``steps`` steps from the same weights, inputs and shuffle permutations; final fc weight."""
    model, optimizer = build("resnet18", 32, CPU, mode, seed=0)
    g = torch.Generator().manual_seed(0)
    im_q, im_k = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 3, 32, 32, generator=g)
    out = [
        float(step(model, optimizer, im_q, im_k, CPU, mode, torch.Generator().manual_seed(i)))
        for i in range(steps)
    ]
    return out, model.encoder_q.fc[2].weight.detach().clone()


@pytest.fixture(scope="module")
def baseline():
    return losses(BASELINE)


@pytest.mark.parametrize(
    "mode",
    [
        our_mode(CPU),
        our_mode(CPU, cpu_channels_last=False),
        dataclasses.replace(BASELINE, name="fused SGD", optimizer_impl="fused"),
    ],
    ids=lambda m: m.name,
)
def test_fp32_fast_settings_match_baseline(baseline, mode):
    ref_losses, ref_w = baseline
    got_losses, got_w = losses(mode)
    assert got_losses[0] == pytest.approx(ref_losses[0], abs=1e-5)  # identical inputs and weights
    assert got_losses[1] == pytest.approx(ref_losses[1], abs=1e-3)  # after the same update
    torch.testing.assert_close(got_w, ref_w, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_matches_baseline_within_bf16_precision(baseline):
    mode = dataclasses.replace(our_mode(torch.device("cuda")), pinned_non_blocking=False)  # the CUDA defaults
    got_losses, _ = losses(mode, steps=1)
    # bf16 keeps 8 mantissa bits; through 18 layers and logits / T (T=0.2) a few % is its precision
    assert got_losses[0] == pytest.approx(baseline[0][0], rel=5e-2)
