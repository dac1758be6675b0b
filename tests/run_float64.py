"""``python tests/run_float64.py MODULE ARGS...``: run an entry point with float64 as the default dtype.

Equality tests between process layouts compare in float64 so that their bound does not depend on the
CPU's float32 kernels; the model, queue and the reference pipeline's views all follow the default dtype.
"""

from __future__ import annotations

import runpy
import sys

import torch

if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
