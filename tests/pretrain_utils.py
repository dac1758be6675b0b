"""Helpers for the pretraining tests: tiny image folders and a tiny two-view transform."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_image_folder(
    root: Path, classes: int = 2, per_class: int = 6, size: int = 40, seed: int = 0
) -> Path:
    """``root/class_<i>/img_<j>.png`` with random RGB content (a few grayscale ones too)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            arr = rng.integers(0, 256, (size, size + 4 * j % 9, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if j == 1:
                img = img.convert("L")
            img.save(d / f"img_{j}.png")
    return root


class TinyTwoViews:
    """Random crop + flip + jitter drawing from torch, ``random`` and numpy: exercises all three RNGs."""

    def __init__(self, size: int = 32) -> None:
        self.size = size

    def view(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        top = random.randint(0, x.shape[1] - self.size)
        left = int(torch.randint(0, x.shape[2] - self.size + 1, ()).item())
        x = x[:, top : top + self.size, left : left + self.size]
        if np.random.rand() < 0.5:
            x = x.flip(-1)
        return (x - 0.5) * float(1.0 + 0.2 * torch.rand(()))

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view(img), self.view(img)


def free_port() -> int:
    """A TCP port free right now on localhost (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
