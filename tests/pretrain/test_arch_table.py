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


def test_small_image_resnet_is_a_torchvision_resnet_of_the_table():
    """resnet18_small: torchvision's names (so every tool reads it), a 3x3 stride-2 stem, no max-pool."""
    import torch
    import torchvision

    from moco_d2.core.backbone import ARCHS, build_resnet

    spec = ARCHS["resnet18_small"]
    cfg = load_config(pretrain_defaults(), None, ["MODEL.ARCH", "resnet18_small"])
    check_config(cfg, world_size=1)
    encoder = build_encoder("resnet18_small", dim=8, mlp=True, bn_splits=2)
    model = build_resnet("resnet18_small")
    assert isinstance(model, torchvision.models.ResNet) and isinstance(model.maxpool, torch.nn.Identity)
    assert set(model.state_dict()) == set(torchvision.models.resnet18().state_dict())
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (2, 2))
    assert spec.stage_channels == (16, 32, 64, 128) and spec.stage_strides == (2, 4, 8, 16)
    assert encoder.fc[0].in_features == spec.feature_dim == 128
    x = torch.randn(4, 3, 28, 28)
    h = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
    assert h.shape == (4, 64, 4, 4)  # res4 of a 28 px image: stride 8
    assert encoder(x).shape == (4, 8)
