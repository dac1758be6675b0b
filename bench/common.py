"""Shared helpers for the benchmarks: synthetic JPEGs, timing, table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_jpegs(
    folder: str | os.PathLike, count: int, seed: int = 0, classes: int = 1, unique: int | None = None
) -> list[Path]:
    """``count`` photo-like JPEGs of ImageNet-like sizes (about 500x375, both orientations).

    Smooth colour fields plus texture and a few shapes, quality 90: they decode and compress like
    photographs rather than like noise or flat colour. Past the first ``unique`` files the rest are
    hard links to them (decoding costs the same; generating thousands of images would not).
    """
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for i in range(count):
        if unique is not None and i >= unique:
            sub = Path(folder) / f"class{i % classes:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            path = sub / f"img{i:05d}.jpg"
            os.link(paths[i % unique], path)
            paths.append(path)
            continue
        w, h = int(rng.integers(440, 501)), int(rng.integers(330, 376))
        if rng.random() < 0.2:
            w, h = h, w
        base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(base).astype(np.int16)
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(4):
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(20, 120)
            arr[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] += rng.integers(-60, 61, 3).astype(np.int16)
        arr += rng.integers(-10, 11, (h, w, 3)).astype(np.int16)
        sub = Path(folder) / f"class{i % classes:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def timed_rounds(fns: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Run each callable ``rounds`` times, interleaved (A B A B ...) so background load hits all
    alike; each returns how many items it processed. Result: median items/second per name."""
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def environment() -> dict[str, object]:
    env: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [
        [f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def print_json(record: dict[str, object]) -> None:
    """The one machine-readable line each benchmark ends with."""
    print(json.dumps(record, sort_keys=True), flush=True)
