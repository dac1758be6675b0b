"""Observability shared by every training loop: meters, metrics.jsonl + TensorBoard, progress, logging."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("moco")


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

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))
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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

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
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fname = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
        fh = logging.FileHandler(Path(out_dir) / fname)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log
