"""The CPU entry points run with the project's OpenMP wait policy unless the user chose one (issue 17).

What is checked is the OpenMP runtime's own view, not an environment variable: libgomp prints its
settings when it loads (``OMP_DISPLAY_ENV=VERBOSE``, at ``import torch``); passive waiting shows as
``GOMP_SPINCOUNT = '0'``, the default spinning as ``'300000'``, ``OMP_WAIT_POLICY=ACTIVE`` as 3e10.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moco_d2.core.threads import ATEN_CAPABILITY_VARIABLE, ONEDNN_ISA_VARIABLES

KERNEL_VARIABLES = (ATEN_CAPABILITY_VARIABLE, *ONEDNN_ISA_VARIABLES)

ROOT = Path(__file__).resolve().parents[2]
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
PASSIVE = "GOMP_SPINCOUNT = '0'"


def run(args: list[str], **extra: str) -> subprocess.CompletedProcess:
    """``python ARGS`` from a shell without OpenMP variables (plus ``extra``), libgomp displaying its ICVs."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env.update(OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT), **extra)
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OPENMP DISPLAY ENVIRONMENT BEGIN" in proc.stderr  # torch's OpenMP runtime was loaded
    return proc


@pytest.mark.parametrize(
    "entry",
    [
        ["-m", "pretrain.train", "--help"],
        ["-m", "moco_d2.evaluation.lincls", "--help"],
        ["detection/train_net.py", "--help"],  # a script: imports torch before any package of ours
    ],
    ids=["pretrain.train", "lincls", "train_net.py"],
)
def test_entry_point_from_a_clean_shell_waits_passively(entry):
    assert PASSIVE in run(entry).stderr


def test_torchrun_workers_inherit_the_policy():
    # the launcher sets it; a worker that is not even Python sees it in its environment
    proc = run(
        ["-m", "moco_d2.core.launch", "--nproc_per_node=1", "--no-python", "printenv", "OMP_WAIT_POLICY"]
    )
    assert PASSIVE in proc.stderr and proc.stdout.split() == ["PASSIVE"]


def test_the_users_own_settings_win():
    err = run(["-m", "pretrain.train", "--help"], OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1").stderr
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in err and PASSIVE not in err
    assert "OMP_NUM_THREADS = '1'" in err
    err = run(["-m", "pretrain.train", "--help"], GOMP_SPINCOUNT="1000").stderr
    assert "GOMP_SPINCOUNT = '1000'" in err


def test_library_use_after_torch_is_left_alone():
    code = "import os, torch, pretrain.train; print(os.environ.get('OMP_WAIT_POLICY'))"
    proc = run(["-c", code])
    assert proc.stdout.split() == ["None"] and PASSIVE not in proc.stderr


def compile_cache(**extra: str) -> str:
    """TORCHINDUCTOR_CACHE_DIR as a fresh ``python -c 'import pretrain.train'`` sees it after the import."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", *KERNEL_VARIABLES)}
    env.update(PYTHONPATH=str(ROOT), **extra)
    code = "import os, pretrain.train; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_each_cpu_kernel_set_compiles_into_its_own_cache():
    # torch.compile's cache reused across kernel sets gave NaN losses and heap corruption (threads.py)
    default = compile_cache()
    avx2 = compile_cache(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    aten_only = compile_cache(ATEN_CPU_CAPABILITY="avx2")
    assert len({default, avx2, aten_only}) == 3
    assert compile_cache(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2") == avx2  # stable
    assert compile_cache(TORCHINDUCTOR_CACHE_DIR="/somewhere/mine") == "/somewhere/mine"  # the user's wins


SPAWN_WITH_SHORT_SPIN = (
    "import os, subprocess, sys\n"
    "import demo  # applies the project's policy before torch loads\n"
    "from moco_d2.core.threads import short_spin_environment\n"
    "env = short_spin_environment(dict(os.environ))\n"
    "sys.exit(subprocess.run([sys.executable, '-c', 'import torch'], env=env).returncode)\n"
)


def test_short_spin_children_spin_briefly_unless_the_user_chose():
    """The demo's detection stages: libgomp in the child spins SHORT_SPIN iterations, not 0, not 300,000;
    a user's own wait policy reaches the child unchanged."""
    from moco_d2.core.threads import SHORT_SPIN

    spin = f"GOMP_SPINCOUNT = '{SHORT_SPIN['GOMP_SPINCOUNT']}'"
    assert spin in run(["-c", SPAWN_WITH_SHORT_SPIN]).stderr
    err = run(["-c", SPAWN_WITH_SHORT_SPIN], OMP_WAIT_POLICY="ACTIVE").stderr
    assert spin not in err and PASSIVE not in err
