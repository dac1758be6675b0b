"""Shared test settings: small thread pools (the CI machine has 2 cores) and deterministic kernels."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and does not fight parallel test runs for the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
