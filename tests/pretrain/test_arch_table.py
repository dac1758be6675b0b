"""MODEL.ARCH: an architecture pretraining cannot build is a one-line UserError at the config check."""

from __future__ import annotations

import pytest

from moco_d2.core.config import load_config, pretrain_defaults
from moco_d2.core.errors import UserError
from pretrain.moco import build_encoder
from pretrain.train import check_config


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "wide_resnet50_2", "vgg16", "resnet51"])
def test_unsupported_arch_is_refused_by_check_config(arch):
    cfg = load_config(pretrain_defaults(), None, ["MODEL.ARCH", arch])
    with pytest.raises(UserError, match="MODEL.ARCH") as exc:
        check_config(cfg, world_size=1)
    assert "\n" not in str(exc.value) and "resnet50" in str(exc.value)


def test_every_arch_check_config_accepts_builds():
    for arch in ("resnet18", "resnet34", "resnet50"):
        cfg = load_config(pretrain_defaults(), None, ["MODEL.ARCH", arch])
        check_config(cfg, world_size=1)
        build_encoder(arch, dim=8, mlp=False)
