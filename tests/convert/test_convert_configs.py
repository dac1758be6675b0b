"""``python -m convert --config-file``: every config train_net accepts validates; bad ones are one line.

Issue 16: a malformed YAML, a ``DATASETS.VOC_CUSTOM`` config and ``voc_c4_random_init.yaml`` all ended in
tracebacks (the validator read them with plain Detectron2 defaults, which lack this project's keys).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from convert.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def r18_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.mark.parametrize("config", ["configs/demo/voc_c4.yaml", "configs/voc_c4_random_init.yaml"])
def test_project_configs_validate(tmp_path, r18_ckpt, capsys, config):
    """VOC_CUSTOM datasets and MODEL.RANDOM_INIT are train_net keys: the detector is the same C4 model."""
    main([str(r18_ckpt), str(tmp_path / "out.pkl"), "--config-file", config])
    out = capsys.readouterr().out
    assert "R18-C4" in out and "OK" in out and config in out
    assert (tmp_path / "out.pkl").is_file()


BAD_CONFIGS = {
    "malformed.yaml": ("MODEL: [unclosed\n  x: : y\n", "is not valid YAML (line 2)"),
    "unknown_key.yaml": ("MODEL:\n  NO_SUCH_KEY: 1\n", "unknown key MODEL.NO_SUCH_KEY"),
    "fpn.yaml": (
        '_BASE_: "{root}/configs/voc_c4.yaml"\nMODEL:\n  BACKBONE:\n    NAME: "build_resnet_fpn_backbone"\n',
        "validated in a C4 detector",
    ),
    "no_such_head.yaml": (
        '_BASE_: "{root}/configs/voc_c4.yaml"\nMODEL:\n  ROI_HEADS:\n    NAME: "NoSuchHeads"\n',
        "Detectron2 cannot build its model",
    ),
    "not_a_mapping.yaml": ("- just\n- a list\n", "is not a YAML mapping"),
    "scalar.yaml": ("just text\n", "is not a YAML mapping"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line(tmp_path, r18_ckpt, capsys, name):
    text, expected = BAD_CONFIGS[name]
    config = tmp_path / name
    config.write_text(text.format(root=ROOT))
    with pytest.raises(SystemExit) as info:
        main([str(r18_ckpt), str(tmp_path / "out.pkl"), "--config-file", str(config)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert name in err and expected in err, err
    assert not (tmp_path / "out.pkl").exists()


def test_pretraining_config_is_refused_in_one_line(tmp_path, r18_ckpt, capsys):
    config = next(iter(sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))))
    with pytest.raises(SystemExit) as info:
        main([str(r18_ckpt), str(tmp_path / "out.pkl"), "--config-file", str(config)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "unknown key" in err, err
