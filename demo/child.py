"""Run one demo stage's entry point reproducibly: a pinned thread count and deterministic algorithms.

    python -m demo.child THREADS -m pretrain.train ARGS...        # like python -m pretrain.train ARGS...
    python -m demo.child THREADS detection/train_net.py ARGS...   # like python detection/train_net.py ...
    python -m demo.child THREADS -c CODE ARGS...                  # like python -c CODE ARGS...

The numbers of a float32 CPU run depend on the intra-op thread count (reductions are split per thread),
so every child of the demo runs with the same count whatever the machine or the caller's environment
(``demo.stages.Runner`` also sets OMP_NUM_THREADS / MKL_NUM_THREADS to it), and with
``torch.use_deterministic_algorithms(True, warn_only=True)``: where torch has a deterministic kernel it
is used, where it has none it warns instead of failing. The entry point itself is unchanged: the report
shows the plain command a user runs.
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str]) -> None:
    if len(argv) < 2 or (argv[1] in ("-m", "-c") and len(argv) < 3):
        raise SystemExit("usage: python -m demo.child THREADS (-m MODULE | -c CODE | SCRIPT) [ARGS...]")
    threads, rest = int(argv[0]), argv[1:]
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if rest[0] == "-m":
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    elif rest[0] == "-c":
        sys.argv = ["-c", *rest[2:]]
        exec(compile(rest[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = list(rest)
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
