"""Observability shared by every training loop: meters, metrics.jsonl + TensorBoard, progress, logging."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from moco_d2.core.errors import UserError
from moco_d2.core.io import atomic_write

T = TypeVar("T")

logger = logging.getLogger("moco")


def _cannot(what: str, path: Path, exc: OSError) -> UserError:
    if exc.errno == errno.ELOOP:
        return UserError(f"{what} {str(path)!r} is a symlink; refusing to write through it (remove it)")
    return UserError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}")


def open_append(path: str | os.PathLike, what: str = "log"):
    """``open(path, "a")`` that never follows a symlink planted at ``path``; errors are one line."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        return os.fdopen(fd, "a", encoding="utf-8")
    except OSError as exc:
        raise _cannot(what, path, exc) from None


def prepare_output_dir(out_dir: str | os.PathLike, key: str = "OUTPUT_DIR") -> Path:
    """Create ``out_dir``; a path that cannot be a writable directory is a one-line UserError."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{key} {str(out)!r} cannot be created: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise UserError(f"{key} {str(out)!r} is not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{key} {str(out)!r} is not writable")
    return out


class _NoFollowFileHandler(logging.FileHandler):
    """A FileHandler that appends without following a symlink."""

    def _open(self):
        return open_append(self.baseFilename, "log file")


class AverageMeter:
    """Running average of a scalar (weighted by sample count)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0


class MetricWriter:
    """Appends scalars to ``<out_dir>/metrics.jsonl`` and, when available, TensorBoard.

    Only the main process should write (``enabled=False`` elsewhere), so files are never interleaved.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        """``resume_step``: the run continues after that step, so records of later steps (written before
        a kill, re-run now) are dropped first: the file never holds a step twice."""
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        prepare_output_dir(self.path.parent)
        if resume_step is not None:
            self.drop_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"), purge_step=resume_step)
            except Exception as exc:  # TensorBoard is optional; metrics.jsonl is the record
                logger.warning("TensorBoard disabled: %s", exc)

    def write(self, step: int, scalars: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for key, value in scalars.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, int | float) and not isinstance(value, bool):
                record[name] = float(value) if math.isfinite(float(value)) else str(value)
                if self._tb is not None and math.isfinite(float(value)):
                    self._tb.add_scalar(name, float(value), int(step))
            else:
                record[name] = value
        try:
            with open_append(self.path, "metrics file") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise _cannot("metrics file", self.path, exc) from None

    def drop_after(self, step: int) -> None:
        """Rewrite metrics.jsonl (atomically) without the records of steps after ``step``."""
        if not self.path.is_file() or self.path.is_symlink():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line (killed mid-write) or not a record: dropped too
            if record_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            atomic_write(self.path, lambda f: f.write("".join(kept).encode()), what="metrics file")
            logger.info(
                "metrics.jsonl: dropped %d record(s) after step %d (re-run now)", len(lines) - len(kept), step
            )

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (for plots and reports)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _LogProgress:
    """Non-TTY progress: a log line every ``period`` items and at the end."""

    def __init__(self, iterable: Iterable[T], total: int | None, desc: str, period: int) -> None:
        self.iterable, self.total, self.desc, self.period = iterable, total, desc, max(1, period)
        self.postfix = ""
        self.n = 0
        self.start = time.time()

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            yield item
            self.n += 1
            if self.n % self.period == 0 or (self.total and self.n == self.total):
                rate = self.n / max(time.time() - self.start, 1e-9)
                of = f"/{self.total}" if self.total else ""
                logger.info("%s %d%s (%.1f it/s) %s", self.desc, self.n, of, rate, self.postfix)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True, period: int = 20
):
    """A tqdm bar on a terminal, periodic log lines otherwise, nothing when disabled (non-main ranks).

    The returned object is iterable and has ``set_postfix_str`` and ``close``.
    """
    if not enabled:
        return _LogProgress(iterable, total, desc, period=1 << 62)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)
    return _LogProgress(iterable, total, desc, period)


def setup_logging(
    out_dir: str | os.PathLike | None = None, rank: int = 0, name: str = "moco"
) -> logging.Logger:
    """Console logging on the main rank (warnings elsewhere) plus ``<out_dir>/log.txt`` (per rank)."""
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    log.addHandler(console)
    if out_dir is not None:
        prepare_output_dir(out_dir)
        fname = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
        fh = _NoFollowFileHandler(Path(out_dir) / fname)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log
