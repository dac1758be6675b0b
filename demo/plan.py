"""What one demo run does and where it lives: the table rows, their titles, the config paths, the Plan.

Shared by ``demo/run.py`` (which builds the stages) and ``demo/report.py`` (which reads their outputs),
so neither imports the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from demo import data as demo_data
from demo.fashion_mnist import CLASS_NAMES

ROWS = ("random_init", "supervised", "moco_v1", "moco_v2")
ROW_TITLES = {
    "random_init": "random init",
    "supervised": "supervised",
    "moco_v1": "MoCo v1",
    "moco_v2": "MoCo v2",
}
CONFIG_DIRS = {
    "full": Path("configs/demo"),
    "quick": Path("configs/demo/quick"),
    "smoke": Path("configs/demo/smoke"),
}
# The VOC root written in configs/demo/voc_c4.yaml; other data roots are passed on the command line.
CONFIG_VOC_ROOT = Path("datasets/demo/voc")
# Rows fine-tuned with several seeds (SEED, SEED + 1, ...) per preset: the seed-to-seed spread of the
# detection numbers, against which the gaps between rows are read. The full demo gives every row its
# own spread (MoCo v1 vs v2 is the closest call); the short presets keep two rows to stay short.
SEEDED_ROWS = {
    "full": ROWS,
    "quick": ("random_init", "moco_v2"),
    "smoke": ("random_init", "moco_v2"),
}
DETECTION_SEEDS = 2
# Intra-op threads of the pretraining stages: one, so the loader worker has the other core of a 2-core
# machine (measured: 1 thread + 1 worker runs MoCo faster than 2 threads + 1 worker there).
PRETRAIN_THREADS = 1
# Written into the work dir with the report: the machine line (CPU, kernel set, torch) of its numbers.
MACHINE_FILE = "machine.txt"


@cache
def config_arch(config_file: str) -> str:
    """MODEL.ARCH of a pretraining config: the one architecture every row and stage of the demo uses."""
    from moco_d2.core.config import load_config, pretrain_defaults

    return str(load_config(pretrain_defaults(), config_file).MODEL.ARCH)


@dataclass(frozen=True)
class Plan:
    """Where everything of one demo run lives."""

    preset: str
    seed: int
    data: demo_data.DemoData
    work: Path
    report_dir: Path
    threads: int = 2  # intra-op threads of every stage (demo/child.py): float32 results depend on it

    def config(self, name: str) -> str:
        return str(CONFIG_DIRS[self.preset] / f"{name}.yaml")

    @property
    def arch(self) -> str:
        """The backbone architecture (``moco_d2.core.backbone.ARCHS``), as MoCo v2's config names it."""
        return config_arch(self.config("moco_v2"))

    def backbone(self, row: str) -> Path:
        """The checkpoint each table row evaluates (formats every tool reads)."""
        return {
            "random_init": self.work / "random_init" / f"{self.arch}_random_init.pth",
            "supervised": self.work / "supervised" / "model_final.pth",
            "moco_v1": self.work / "pretrain" / "moco_v1" / "model_final.pth",
            "moco_v2": self.work / "pretrain" / "moco_v2" / "model_final.pth",
        }[row]

    def detection_seeds(self, row: str) -> list[int]:
        """The seeds ``row``'s detector is fine-tuned with."""
        return [self.seed + i for i in range(DETECTION_SEEDS if row in SEEDED_ROWS[self.preset] else 1)]

    def detection_dir(self, row: str, seed: int) -> Path:
        """Output of one fine-tuning run (the first seed keeps the plain row name)."""
        name = row if seed == self.seed else f"{row}_seed{seed}"
        return self.work / "detection" / name

    def detection_opts(self, seed: int | None = None) -> list[str]:
        """Overrides every detection command (and the checks that rebuild its model) shares."""
        opts = ["SEED", str(self.seed if seed is None else seed)]
        if self.data.voc.resolve() != CONFIG_VOC_ROOT.resolve():
            custom = [
                {
                    "name": f"fmnist_scenes_{split}",
                    "root": str(self.data.voc),
                    "split": split,
                    "classes": list(CLASS_NAMES),
                }
                for split in ("trainval", "test")
            ]
            opts += ["DATASETS.VOC_CUSTOM", json.dumps(custom)]  # a valid Python literal for yacs
        return opts
