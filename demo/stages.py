"""Run the demo's stages -- real command-line entry points in child processes, independent ones side by
side -- with a progress bar each.

A stage is skipped when its output already exists, so a rerun after a crash continues where it
stopped (the children resume their own checkpoints). Every finished stage is recorded in
``stages.json`` (command, threads, start and end, summary) for the report.
"""

from __future__ import annotations

import json
import math
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
from typing import IO, Any

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
    # stages next to each other with the same group name run side by side (Runner.jobs at a time)
    concurrent: str = ""
    # key of a stage of the same group that must finish before this one starts (it writes what this reads)
    after: str = ""

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
@dataclass
class _Child:
    """A running child stage: its process, log and progress bar."""

    stage: Stage
    tag: str
    proc: subprocess.Popen
    log_path: Path
    logf: IO[bytes]
    start: float
    bar: Any
    last_line: float


def side_by_side_threads(threads: int, jobs: int) -> int:
    """Intra-op threads of each of ``jobs`` children sharing the ``threads`` of one child running alone."""
    return max(1, threads // max(1, jobs))


def wall_seconds(records: dict[str, dict]) -> float:
    """Wall-clock covered by the recorded stages: the union of their [start, end] intervals, so stages
    that ran side by side count once and the pauses between resumed invocations not at all (a record
    without times, from an older demo, adds its own seconds)."""
    spans = sorted((r["start"], r["end"]) for r in records.values() if "start" in r and "end" in r)
    total = sum(r.get("seconds", 0.0) for r in records.values() if "start" not in r or "end" not in r)
    reach = -math.inf
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


class Runner:
    """Runs stages in order, shows a bar per running stage and a one-line summary when each finishes.

    Consecutive stages with the same ``Stage.concurrent`` group run ``jobs`` at a time, each child with
    ``threads // jobs`` intra-op threads unless the stage sets its own: on a 2-core machine two 1-thread
    children of Detectron2's small C4 detector do 1.7x the work of one 2-thread child (measured), so
    independent stages are cheaper side by side than one after the other.
    """

    def __init__(self, work: Path, total: int, log=print, threads: int = 2, jobs: int = 1) -> None:
        self.work = work
        self.threads = threads  # intra-op threads of a child running alone (its numbers depend on it)
        self.jobs = max(1, jobs)  # children of one concurrent group running at once
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

    def child_threads(self, stage: Stage) -> int:
        """The intra-op threads ``stage``'s child runs with (recorded: its numbers depend on it)."""
        if stage.threads:
            return stage.threads
        return side_by_side_threads(self.threads, self.jobs) if stage.concurrent else self.threads

    def run_all(self, stages: list[Stage]) -> None:
        """Every stage in order; each run of consecutive stages sharing a concurrent group side by side."""
        i = 0
        while i < len(stages):
            j = i + 1
            while stages[i].concurrent and j < len(stages) and stages[j].concurrent == stages[i].concurrent:
                j += 1
            self.run_group(stages[i:j], self.jobs if stages[i].concurrent else 1)
            i = j

    def run(self, stage: Stage) -> None:
        self.run_group([stage], 1)

    def run_group(self, stages: list[Stage], width: int) -> None:
        """Run the unfinished ``stages`` with at most ``width`` children at once. A failing child stops
        the others (they resume from their checkpoints on the next run) and raises StageFailed."""
        todo = []
        for stage in stages:
            self.index += 1
            tag = f"[{self.index}/{self.total}]"
            if stage.finished():
                rec = self.records.get(stage.key, {})
                took = f", took {fmt_seconds(rec['seconds'])} then" if "seconds" in rec else ""
                self.log(f"- {tag} {stage.title}: already done ({stage.done}{took}); skipped")
            elif stage.argv is None:  # in-process work runs alone, in order
                assert stage.func is not None and width == 1, "only child stages run side by side"
                start = time.time()
                self.log(f"  {tag} {stage.title} ...")
                stage.func()
                self._finished(stage, tag, start)
            else:
                todo.append((stage, tag))
        running: list[_Child] = []
        try:
            while todo or running:
                while len(running) < width and (ready := self._next_ready(todo, running)) is not None:
                    running.append(self._start_child(*todo.pop(ready)))
                if todo and not running:
                    raise RuntimeError(
                        f"demo stages wait on each other in a cycle: {[s.key for s, _ in todo]}"
                    )
                time.sleep(0.5)
                for child in list(running):
                    self._show_progress(child)
                    if child.proc.poll() is not None:
                        running.remove(child)
                        self._close(child)
                        self._check_exit(child)
                        self._finished(child.stage, child.tag, child.start)
        except BaseException:
            for child in running:
                os.killpg(child.proc.pid, signal.SIGTERM)
                child.proc.wait()
                self._close(child)
            raise

    @staticmethod
    def _next_ready(todo: list[tuple[Stage, str]], running: list[_Child]) -> int | None:
        """Index of the first waiting stage whose ``after`` stage is neither waiting nor running."""
        pending = {stage.key for stage, _ in todo} | {child.stage.key for child in running}
        return next((i for i, (stage, _) in enumerate(todo) if stage.after not in pending), None)

    def _finished(self, stage: Stage, tag: str, start: float) -> None:
        end = time.time()
        if not stage.finished():
            raise StageFailed(f"stage {stage.title!r} finished but did not write {stage.done}")
        summary = stage.summary()
        record = {
            "title": stage.title,
            "command": stage.command_line(),
            "seconds": round(end - start, 1),
            "start": round(start, 1),
            "end": round(end, 1),
            "summary": summary,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if stage.argv is not None:
            record["threads"] = self.child_threads(stage)
        self.records[stage.key] = record
        self._save_records()
        self.log(f"✓ {tag} {stage.title} ({fmt_seconds(end - start)}){': ' + summary if summary else ''}")

    def _start_child(self, stage: Stage, tag: str) -> _Child:
        from tqdm import tqdm

        log_path = self.work / "logs" / f"{stage.key.replace('/', '.')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # A pinned thread count whatever the caller's environment: reproducible numbers. The wait policy
        # (moco_d2.core.threads, applied when the demo package loaded) is in os.environ.
        threads = str(self.child_threads(stage))
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if stage.short_spin:
            env = short_spin_environment(env)
        logf = open(log_path, "ab")  # noqa: SIM115 -- closed by _close when the child ends
        logf.write(f"\n$ {stage.command_line()}\n".encode())
        logf.flush()
        # Own process group, so an interrupt also stops the child's data-loader workers.
        # demo.child pins the threads and turns on deterministic algorithms, then runs stage.argv.
        assert stage.argv is not None
        argv = [stage.argv[0], "-m", "demo.child", threads, *stage.argv[1:]]
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
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
        now = time.time()
        return _Child(stage, tag, proc, log_path, logf, now, bar, now)

    def _show_progress(self, child: _Child) -> None:
        """Poll the child's log for progress; a tqdm bar on a terminal, a line every 30 s otherwise."""
        frac = self._fraction(child.stage, child.log_path)
        if frac is not None:
            child.bar.update(int(100 * frac) - child.bar.n)
        now = time.time()
        if not self.tty and now - child.last_line >= 30:
            child.last_line = now
            pct = f"{100 * frac:3.0f}%" if frac is not None else "..."
            self.log(f"    {child.stage.title}: {pct} ({fmt_seconds(now - child.start)})")

    @staticmethod
    def _close(child: _Child) -> None:
        child.bar.close()
        child.logf.close()

    def _check_exit(self, child: _Child) -> None:
        if child.proc.returncode != 0:
            tail = child.log_path.read_text(errors="replace").splitlines()[-25:]
            self.log("\n".join("    | " + line for line in tail))
            raise StageFailed(
                f"stage {child.stage.title!r} failed (exit code {child.proc.returncode}); full log: "
                f"{child.log_path}; command: {child.stage.command_line()}"
            )

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
