"""The CPU thread policy of every entry point, decided here and nowhere else (issue 17).

torch's CPU build runs its intra-op parallelism on GNU OpenMP (libgomp), which reads its environment
once, when ``import torch`` loads it. Left alone, a libgomp thread that waits for work spins for
300,000 iterations before it sleeps; on a machine where anything else wants a core (a data-loader
worker, another job, a CI neighbour) the spinning threads steal it, worst in the many tiny ops of an
8-way split batch norm. Measured on a shared 2-core machine (bench/README.md, "CPU results"): a
demo-scale pretraining run with one other busy process took about twice as long with the default as
with ``OMP_WAIT_POLICY=PASSIVE``, and passive waiting cost the trainer nothing on a quiet machine.
(A quiet machine running Detectron2's small-image C4 detector is the exception: it pays each passive
wake-up hundreds of times per iteration, so the demo runs those stages with :data:`SHORT_SPIN`.)

So :func:`apply_policy`, called by each package's ``__init__`` (``moco_d2``, ``pretrain``,
``convert``, ``detection``, ``demo``, ``bench``) and at the top of ``detection/train_net.py``, sets

* ``OMP_WAIT_POLICY=PASSIVE`` (libgomp then spins 0 iterations: ``GOMP_SPINCOUNT`` 0),

unless the user chose a wait policy (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set: theirs wins). The
intra-op thread count stays torch's default (one per core) or the user's ``OMP_NUM_THREADS`` /
``torch.set_num_threads``: with passive waiting, fewer threads than cores was not faster even with a
loader worker and a busy process sharing the two cores (measured, bench/README.md), so nothing here
second-guesses it. ``KMP_BLOCKTIME`` is not set: it is Intel OpenMP's knob, and torch's CPU wheels
load libgomp.

The same call gives ``torch.compile``'s on-disk cache one directory per CPU kernel set
(``TORCHINDUCTOR_CACHE_DIR``, unless the user set it): measured 2026-12-03 (torch 2.14.1, CPU inductor),
a demo pretraining compiled with the default kernels and then run with ``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` on the same machine reused the cached code and got a NaN loss at iteration 0;
the other way round the process aborted (glibc "malloc assertion failure", segfaults). With separate
directories both run. It is decided here because torch sets the variable itself once it is imported.

Environment variables propagate to child processes, so ``torchrun`` workers (``moco_d2.core.launch``),
the demo's stages and data-loader workers inherit the policy. When torch is already imported (this
project used as a library from someone else's program) the runtime has read its settings: nothing is
changed. This module imports nothing but the standard library, so it can run before torch.
"""

from __future__ import annotations

import getpass
import os
import sys
import tempfile

# The variables that select how an OpenMP thread waits; any of them set by the user means "theirs".
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
# The variables that pick a CPU kernel set: ATen's, then oneDNN's ISA cap (current name, then its older one).
ATEN_CAPABILITY_VARIABLE = "ATEN_CPU_CAPABILITY"
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")

_applied: dict[str, str] | None = None


def apply_policy() -> dict[str, str]:
    """Set the project's OpenMP settings in ``os.environ`` if torch is not loaded yet and the user set
    none; returns what this call (or an earlier one) set, ``{}`` when nothing was changed. Idempotent."""
    global _applied
    if _applied is not None:
        return _applied
    separate_compile_cache()
    _applied = {}
    if "torch" in sys.modules or any(os.environ.get(v) for v in WAIT_VARIABLES):
        return _applied
    for name, value in POLICY.items():
        os.environ[name] = value
        _applied[name] = value
    return _applied


# A bounded spin (libgomp iterations, then sleep) for a child that has the machine to itself and runs many
# small ops: Detectron2's C4 detector at the demo's scale runs hundreds of short parallel regions per
# iteration, and with the passive wait every one of them first wakes its sleeping threads. Measured on a quiet 2-core Intel Xeon
# (2026-12-04, the demo's detector, 78 iterations, 2 threads + 1 loader worker): 0.28-0.31 s/it passive,
# 0.22 at 3,000, 0.20 at 30,000, 0.18-0.19 at libgomp's default 300,000; the same AP to the last digit.
SHORT_SPIN = {"GOMP_SPINCOUNT": "30000"}


def short_spin_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :data:`SHORT_SPIN` instead of this module's passive wait, for a child process; unchanged
    when the wait policy is the user's (theirs wins) rather than the one :func:`apply_policy` set."""
    if not _applied or any(env.get(v) != _applied.get(v) for v in WAIT_VARIABLES):
        return dict(env)
    out = {k: v for k, v in env.items() if k not in WAIT_VARIABLES}
    out.update(SHORT_SPIN)
    return out


def compile_cache_dir() -> str:
    """``torch.compile``'s cache directory for this process's CPU kernel set: torch's default location
    (``<tmp>/torchinductor_<user>``) suffixed with ``ATEN_CPU_CAPABILITY`` and oneDNN's ISA cap."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers): the uid is as unique
        user = str(os.getuid())
    onednn = next((os.environ[v] for v in ONEDNN_ISA_VARIABLES if os.environ.get(v)), "")
    kernels = [os.environ.get(ATEN_CAPABILITY_VARIABLE) or "default", onednn or "default"]
    name = "_".join(["torchinductor", user, *kernels]).replace(os.sep, "_").lower()
    return os.path.join(tempfile.gettempdir(), name)


def separate_compile_cache() -> None:
    """Set ``TORCHINDUCTOR_CACHE_DIR`` to :func:`compile_cache_dir` unless it is set (by the user, or by
    torch, which sets it when imported: then it is too late anyway)."""
    if "torch" not in sys.modules and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()


def describe() -> str:
    """One line for the logs: the wait policy in effect and who chose it, and the intra-op threads."""
    policy = (
        ", ".join(f"{v}={os.environ[v]}" for v in WAIT_VARIABLES if os.environ.get(v)) or "runtime default"
    )
    source = "moco_d2.core.threads" if _applied else "user/environment"
    line = f"OpenMP wait: {policy} ({source})"
    if "torch" in sys.modules:
        line += f"; intra-op threads {sys.modules['torch'].get_num_threads()}"
    return line
