"""``torchrun`` for the Makefile's training targets, with a one-line report when a worker fails.

A worker that stops on a user's mistake prints its own one-line error (``moco_d2.core.errors``); plain
``torchrun`` then adds a page-long ``ChildFailedError`` traceback from its elastic agent. This runs the
same launcher (same arguments, same environment) and replaces that traceback with one line that names
the failed rank and exit code, exiting with that code.

    python -m moco_d2.core.launch --nproc_per_node=8 -m pretrain.train --config-file ...
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def exit_code(raw: int) -> int:
    """A worker's exit status as a shell would report it (signals as 128 + N)."""
    return raw if raw > 0 else (128 - raw if raw < 0 else 1)


def main(argv: list[str] | None = None) -> None:
    # Its "failed (exitcode: N) local_rank: ..." line says what the line below says.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = exit_code(failure.exitcode)
        more = f" ({len(exc.failures) - 1} more ranks failed)" if len(exc.failures) > 1 else ""
        print(
            f"error: {exc.name} failed on rank {rank} with exit code {code}{more}; its own message is above",
            file=sys.stderr,
        )
        sys.exit(code)
    except SignalException as exc:  # the launcher itself was told to stop (preemption, Ctrl-C, scancel)
        print(
            f"error: stopped by {exc.sigval.name}; the workers were asked to stop and each writes a "
            "checkpoint first (pretraining): continue with RESUME auto",
            file=sys.stderr,
        )
        sys.exit(128 + int(exc.sigval))


if __name__ == "__main__":
    main()
