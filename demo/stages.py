"""Run one demo stage -- a real command-line entry point in a child process -- with a progress bar.

A stage is skipped when its output already exists, so a rerun after a crash continues where it
stopped (the children resume their own checkpoints). Every finished stage is recorded in
``stages.json`` (command, seconds, summary) for the report.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from moco_d2.core.errors import UserError
from moco_d2.core.io import write_json_atomic
from moco_d2.core.threads import short_spin_environment

# Fraction of a stage done, read from the tail of its log; None when the log says nothing yet.
ProgressFn = Callable[[str], float | None]


class StageFailed(UserError):
    """A child command failed; the message names the stage and its log."""


@dataclass
class Stage:
    key: str  # unique id, also the log file name (e.g. "pretrain/moco_v2")
    title: str  # what the user sees
    done: Path  # the output whose existence means the stage is finished (unless is_done says otherwise)
    argv: list[str] | None = None  # child command (``python ...``), or
    func: Callable[[], None] | None = None  # in-process work (small, fast steps)
    progress: ProgressFn | None = None
    summary: Callable[[], str] = field(default=lambda: "")
    # How the command is shown in the report (``python`` instead of the venv's absolute path).
    display: str = ""
    is_done: Callable[[], bool] | None = None  # a stricter completion test than ``done`` existing
    threads: int | None = None  # intra-op threads of this child (None: the Runner's)
    # a short bounded OpenMP spin instead of the passive wait (moco_d2.core.threads.SHORT_SPIN): numbers unchanged
    short_spin: bool = False

    def finished(self) -> bool:
        return self.is_done() if self.is_done is not None else self.done.exists()

    def command_line(self) -> str:
        if self.display:
            return self.display
        assert self.argv is not None
        return shlex.join(["python", *self.argv[1:]])


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ------------------------------------------------------------------------------ progress parsers
_BAR = re.compile(r"epoch (\d+) (\d+)/(\d+) \(")


def epoch_progress(epochs: int, first_epoch: int) -> ProgressFn:
    """``moco_d2.core.metrics.progress`` lines ("epoch E n/N (x it/s)"); epochs numbered from first_epoch."""

    def parse(log: str) -> float | None:
        hits = _BAR.findall(log)
        if not hits:
            return None
        e, n, total = (int(v) for v in hits[-1])
        return min(1.0, (e - first_epoch + n / max(total, 1)) / max(epochs, 1))

    return parse


def probe_progress() -> ProgressFn:
    """The linear probe on precomputed features: its "epoch e/E:" lines (feature extraction shows none)."""
    line = re.compile(r"epoch (\d+)/(\d+):")

    def parse(log: str) -> float | None:
        hits = line.findall(log)
        return int(hits[-1][0]) / max(int(hits[-1][1]), 1) if hits else None

    return parse


def detectron2_progress(max_iter: int) -> ProgressFn:
    """Detectron2's "iter: N" training lines (90 %) then "Inference done n/N" (last 10 %)."""
    it_re, inf_re = re.compile(r"iter: (\d+)"), re.compile(r"Inference done (\d+)/(\d+)")

    def parse(log: str) -> float | None:
        inf = inf_re.findall(log)
        if inf:
            n, total = (int(v) for v in inf[-1])
            return 0.9 + 0.1 * n / max(total, 1)
        its = it_re.findall(log)
        return 0.9 * (int(its[-1]) + 1) / max(max_iter, 1) if its else None

    return parse


def two_pass_progress() -> ProgressFn:
    """kNN: a bar over the bank, then one over the queries (each "n/N (x it/s)")."""
    bar = re.compile(r" (\d+)/(\d+) \([\d.]+ it/s\)")

    def parse(log: str) -> float | None:
        hits = bar.findall(log)
        if not hits:
            return None
        n, total = (int(v) for v in hits[-1])
        passes = sum(1 for a, b in hits if a == b)  # finished passes
        done_before = min(passes - (1 if n == total else 0), 1)
        return min(1.0, (done_before + n / max(total, 1)) / 2)

    return parse


# ------------------------------------------------------------------------------------- the runner
class Runner:
    """Runs stages in order, shows a bar per stage and a one-line summary when each finishes."""

    def __init__(self, work: Path, total: int, log=print, threads: int = 2) -> None:
        self.work = work
        self.threads = threads  # intra-op threads of every child (its numbers depend on it)
        self.total = total
        self.index = 0
        self.log = log
        self.records_path = work / "stages.json"
        self.records: dict[str, dict] = (
            json.loads(self.records_path.read_text()) if self.records_path.is_file() else {}
        )
        self.tty = sys.stderr.isatty()

    def _save_records(self) -> None:
        write_json_atomic(self.records, self.records_path)

    def run(self, stage: Stage) -> None:
        self.index += 1
        tag = f"[{self.index}/{self.total}]"
        if stage.finished():
            rec = self.records.get(stage.key, {})
            took = f", took {fmt_seconds(rec['seconds'])} then" if "seconds" in rec else ""
            self.log(f"- {tag} {stage.title}: already done ({stage.done}{took}); skipped")
            return
        start = time.time()
        if stage.argv is not None:
            self._run_child(stage, tag)
        else:
            assert stage.func is not None
            self.log(f"  {tag} {stage.title} ...")
            stage.func()
        seconds = time.time() - start
        if not stage.finished():
            raise StageFailed(f"stage {stage.title!r} finished but did not write {stage.done}")
        summary = stage.summary()
        self.records[stage.key] = {
            "title": stage.title,
            "command": stage.command_line(),
            "seconds": round(seconds, 1),
            "summary": summary,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._save_records()
        self.log(f"✓ {tag} {stage.title} ({fmt_seconds(seconds)}){': ' + summary if summary else ''}")

    def _run_child(self, stage: Stage, tag: str) -> None:
        log_path = self.work / "logs" / f"{stage.key.replace('/', '.')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Same thread count for every child whatever the caller's environment: reproducible numbers. The
        # wait policy (moco_d2.core.threads, applied when the demo package loaded) is in os.environ.
        threads = str(stage.threads or self.threads)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if stage.short_spin:
            env = short_spin_environment(env)
        with open(log_path, "ab") as logf:
            logf.write(f"\n$ {stage.command_line()}\n".encode())
            logf.flush()
            # Own process group, so an interrupt also stops the child's data-loader workers.
            # demo.child pins the threads and turns on deterministic algorithms, then runs stage.argv.
            argv = [stage.argv[0], "-m", "demo.child", threads, *stage.argv[1:]]
            proc = subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                self._watch(proc, stage, tag, log_path)
            except BaseException:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
        if proc.returncode != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-25:]
            self.log("\n".join("    | " + line for line in tail))
            raise StageFailed(
                f"stage {stage.title!r} failed (exit code {proc.returncode}); full log: {log_path}; "
                f"command: {stage.command_line()}"
            )

    def _watch(self, proc: subprocess.Popen, stage: Stage, tag: str, log_path: Path) -> None:
        """Poll the child's log for progress; a tqdm bar on a terminal, a line every 30 s otherwise."""
        from tqdm import tqdm

        desc = f"  {tag} {stage.title}"
        bar = tqdm(
            total=100,
            desc=desc,
            bar_format="{desc}: {percentage:3.0f}%|{bar:30}| {elapsed}<{remaining}",
            disable=not self.tty,
            leave=False,
        )
        if not self.tty:
            self.log(f"{desc} ...")
        last_line, start = 0.0, time.time()
        while proc.poll() is None:
            time.sleep(0.5)
            frac = self._fraction(stage, log_path)
            if frac is not None:
                bar.update(int(100 * frac) - bar.n)
            now = time.time()
            if not self.tty and now - last_line >= 30:
                last_line = now
                pct = f"{100 * frac:3.0f}%" if frac is not None else "..."
                self.log(f"    {stage.title}: {pct} ({fmt_seconds(now - start)})")
        bar.close()

    @staticmethod
    def _fraction(stage: Stage, log_path: Path) -> float | None:
        if stage.progress is None:
            return None
        try:
            with open(log_path, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - 20000))
                tail = f.read().decode(errors="replace")
        except OSError:
            return None
        # Only the current run's lines count (the log is appended to on resume).
        tail = tail.rsplit("\n$ ", 1)[-1]
        return stage.progress(tail)
