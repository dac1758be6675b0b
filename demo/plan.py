"""What one demo run does and where it lives: the table rows, their titles, the config paths, the Plan.

Shared by ``demo/run.py`` (which builds the stages) and ``demo/report.py`` (which reads their outputs),
so neither imports the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from demo import data as demo_data
from demo.fashion_mnist import CLASS_NAMES

if TYPE_CHECKING:
    from fvcore.common.config import CfgNode

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
# Fine-tuning seeds (SEED, SEED + 1, ...) per row and preset: the seed-to-seed noise of the detection
# numbers, against which the gaps between rows are read (demo.stats). One seed's AP moves by up to ~7
# points at this scale (sd 2-3, as much for random init as for MoCo), so the seeds go where Welch's margin
# is widest: MoCo v1 vs v2 (the paper's gap is 1 AP) seven each, a ~2 AP margin on their gap; random
# init five (with three, t at df ~2 is 4.3: on AVX2 kernels MoCo v1's +4.6 AP lead was within ±5.9, with
# five it is beyond ±3.0); supervised, a reference row, one. 20 fine-tunings, two at a time. The short
# presets seed two rows twice.
_SHORT_SEEDS = {"random_init": 2, "supervised": 1, "moco_v1": 1, "moco_v2": 2}
DETECTION_SEEDS = {
    "full": {"random_init": 5, "supervised": 1, "moco_v1": 7, "moco_v2": 7},
    "quick": _SHORT_SEEDS,
    "smoke": _SHORT_SEEDS,
}
# Intra-op threads of the pretraining stages: one, so the loader worker has the other core of a 2-core
# machine (measured: 1 thread + 1 worker runs MoCo faster than 2 threads + 1 worker there).
PRETRAIN_THREADS = 1
# Written into the work dir with the report: the machine line (CPU, kernel set, torch) of its numbers.
MACHINE_FILE = "machine.txt"
# Written next to the report: every number of its table with that machine line, so a later run on any
# machine can be compared with the committed report (`python -m demo.compare results/demo/numbers.json RUN`).
NUMBERS_FILE = "numbers.json"


@cache
def pretrain_config(config_file: str) -> CfgNode:
    """A pretraining config as ``pretrain.train`` resolves it (``_BASE_`` chain included), frozen: it is shared."""
    from moco_d2.core.config import load_config, pretrain_defaults

    cfg = load_config(pretrain_defaults(), config_file)
    cfg.freeze()
    return cfg


def config_arch(config_file: str) -> str:
    """MODEL.ARCH of a pretraining config: the one architecture every row and stage of the demo uses."""
    return str(pretrain_config(config_file).MODEL.ARCH)


@dataclass(frozen=True)
class Plan:
    """Where everything of one demo run lives."""

    preset: str
    seed: int
    data: demo_data.DemoData
    work: Path
    report_dir: Path
    threads: int = (
        2  # intra-op threads of a stage running alone (demo/child.py): float32 results depend on it
    )
    jobs: int = 2  # independent stages side by side (demo.stages.Runner), each with threads // jobs threads

    def config(self, name: str) -> str:
        return str(CONFIG_DIRS[self.preset] / f"{name}.yaml")

    @property
    def arch(self) -> str:
        """The backbone architecture (``moco_d2.core.backbone.ARCHS``), as MoCo v2's config names it."""
        return config_arch(self.config("moco_v2"))

    def temperature(self, row: str) -> float:
        """MODEL.T of a MoCo row's pretraining config (their losses are on different scales)."""
        return float(pretrain_config(self.config(row)).MODEL.T)

    def backbone(self, row: str) -> Path:
        """The checkpoint each table row evaluates (formats every tool reads)."""
        return {
            "random_init": self.work / "random_init" / f"{self.arch}_random_init.pth",
            "supervised": self.work / "supervised" / "model_final.pth",
            "moco_v1": self.work / "pretrain" / "moco_v1" / "model_final.pth",
            "moco_v2": self.work / "pretrain" / "moco_v2" / "model_final.pth",
        }[row]

    def frozen_features(self, row: str) -> Path:
        """The file caching ``row``'s frozen features: extracted once by its kNN stage, read by its linear probe."""
        return self.work / "frozen_features" / f"{row}.pt"

    def detection_seeds(self, row: str) -> list[int]:
        """The seeds ``row``'s detector is fine-tuned with."""
        return [self.seed + i for i in range(DETECTION_SEEDS[self.preset][row])]

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
