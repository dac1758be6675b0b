"""configs/pretrain/*.yaml: every recipe resolves, with the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from moco_d2.core.config import load_config, pretrain_defaults
from pretrain.train import check_config, learning_rate

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"

# name -> (MLP, T, AUG.NAME, SCHEDULE, EPOCHS)
RECIPES = {
    "moco_v2_200ep": (True, 0.2, "mocov2", "cosine", 200),
    "moco_v2_800ep": (True, 0.2, "mocov2", "cosine", 800),
    "moco_v1_200ep": (False, 0.07, "mocov1", "step", 200),
    "ablation_mlp": (True, 0.2, "mocov1", "step", 200),
    "ablation_augplus": (False, 0.07, "mocov2", "step", 200),
    "ablation_mlp_augplus": (True, 0.2, "mocov2", "step", 200),
}


def test_every_config_file_is_covered():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == {*RECIPES, "Base-MoCo"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe(name):
    cfg = load_config(pretrain_defaults(), str(CONFIGS / f"{name}.yaml"), [])
    schedule = RECIPES[name][3]
    got = (cfg.MODEL.MLP, cfg.MODEL.T, cfg.AUG.NAME, cfg.SOLVER.SCHEDULE, cfg.SOLVER.EPOCHS)
    assert got == RECIPES[name]
    assert (cfg.MODEL.ARCH, cfg.MODEL.DIM, cfg.MODEL.K, cfg.MODEL.M) == ("resnet50", 128, 65536, 0.999)
    assert (cfg.SOLVER.BATCH_SIZE, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY) == (256, 0.9, 1e-4)
    assert learning_rate(cfg, 0) == pytest.approx(0.03)
    if schedule == "step":
        assert list(cfg.SOLVER.STEPS) == [120, 160]
    for world in (1, 8, 16):  # single process (8 emulated devices), 8 GPUs, 2 nodes x 8
        check_config(cfg, world)
