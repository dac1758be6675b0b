"""Bad input gives one clear UserError (one line, exit code 2 from the CLI) and never a partial output file."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from convert import to_detectron2, to_torchvision
from convert.__main__ import main
from moco_d2.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    return torchvision.models.resnet18().state_dict()


def only_inputs_left(folder: Path, *inputs: str) -> bool:
    return sorted(p.name for p in folder.iterdir()) == sorted(inputs)


def convert_error(src: Path, out: Path, **kwargs) -> str:
    """Run the conversion (validation off: every case here must fail before writing) and return the error."""
    with pytest.raises(UserError) as info:
        to_detectron2(src, out, validate=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "does not exist" in convert_error(tmp_path / "nope.pth", tmp_path / "out.pkl")
    assert only_inputs_left(tmp_path)


def test_truncated_file(tmp_path, r18_state):
    good = tmp_path / "good.pth"
    torch.save(r18_state, good)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = convert_error(bad, tmp_path / "out.pkl")
    assert "bad.pth" in message and "truncated or corrupt" in message
    assert only_inputs_left(tmp_path, "good.pth", "bad.pth")


@pytest.mark.parametrize("payload", ["plain_pickle", "list", "text"])
def test_not_a_checkpoint(tmp_path, payload):
    src = tmp_path / "in.pth"
    if payload == "plain_pickle":
        src.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    elif payload == "list":
        torch.save([torch.zeros(2)], src)
    else:
        src.write_text("not a checkpoint at all\n")
    message = convert_error(src, tmp_path / "out.pkl")
    assert "in.pth" in message
    assert only_inputs_left(tmp_path, "in.pth")


def test_dict_without_resnet_weights(tmp_path):
    src = tmp_path / "in.pth"
    torch.save({"state_dict": {"module.linear.weight": torch.zeros(3, 3)}, "epoch": 1}, src)
    assert "no ResNet" in convert_error(src, tmp_path / "out.pkl")
    assert only_inputs_left(tmp_path, "in.pth")


def test_resnet18_when_resnet50_is_asked_for(tmp_path, r18_state):
    src = tmp_path / "in.pth"
    torch.save({f"module.encoder_q.{k}": v for k, v in r18_state.items()}, src)
    message = convert_error(src, tmp_path / "out.pkl", arch="resnet50")
    assert "resnet18" in message and "resnet50" in message
    assert only_inputs_left(tmp_path, "in.pth")


def test_incomplete_or_misshapen_backbone(tmp_path, r18_state):
    missing = {k: v for k, v in r18_state.items() if k != "layer3.1.bn2.running_var"}
    src = tmp_path / "missing.pth"
    torch.save(missing, src)
    message = convert_error(src, tmp_path / "out.pkl")
    assert "layer3.1.bn2.running_var" in message and "missing" in message

    misshapen = dict(r18_state)
    misshapen["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    src = tmp_path / "misshapen.pth"
    torch.save(misshapen, src)
    message = convert_error(src, tmp_path / "out.pkl")
    assert "layer2.0.conv1.weight" in message and "(128, 64, 3, 3)" in message
    assert only_inputs_left(tmp_path, "missing.pth", "misshapen.pth")


def test_unwritable_output(tmp_path, r18_state):
    src = tmp_path / "in.pth"
    torch.save(r18_state, src)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot write output" in convert_error(src, blocker / "out.pkl")
    with pytest.raises(UserError, match="cannot write output"):
        to_torchvision(src, blocker / "out.pth", validate=False)
    (tmp_path / "dir.pkl").mkdir()
    assert "is a directory" in convert_error(src, tmp_path / "dir.pkl")
    assert ".pkl" in convert_error(src, tmp_path / "out.pth")
    with pytest.raises(UserError, match="is the input"):
        to_torchvision(src, src, validate=False)
    assert only_inputs_left(tmp_path, "in.pth", "a_file", "dir.pkl")


class Payload:
    """Unpickling this would create ``marker``: the attack weights_only loading must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_carrying_pickle_is_refused_unrun(tmp_path, writer):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    obj = {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, src)
    else:
        src.write_bytes(pickle.dumps(obj))
    assert not marker.exists()

    message = convert_error(src, tmp_path / "out.pkl")

    assert "evil.pth" in message
    assert not marker.exists()
    assert only_inputs_left(tmp_path, "evil.pth")


def test_cli_success_and_error(tmp_path, r18_state, capsys):
    src = tmp_path / "in.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in r18_state.items()}, "kind": "supervised"}, src)

    main([str(src), "--to", "torchvision"])  # default output name, validated
    out = capsys.readouterr().out
    assert "classification checkpoint (this project)" in out and "resnet18" in out and "OK" in out
    assert (tmp_path / "in_torchvision.pth").is_file()

    main([str(src), str(tmp_path / "d2.pkl")])  # validated against configs/voc_c4.yaml as R18-C4
    out = capsys.readouterr().out
    assert "R18-C4" in out and "OK" in out and "unmatched" in out
    assert (tmp_path / "d2.pkl").is_file()

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "missing.pth"), str(tmp_path / "out.pkl")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.pth" in err and len(err.splitlines()) == 1


def test_cli_process_exit_code(tmp_path):
    """The real entry point, as `make convert` runs it: one line on stderr, status 2, nothing written."""
    src = tmp_path / "in.pth"
    src.write_bytes(pickle.dumps({"not": "a checkpoint"}, protocol=4))
    proc = subprocess.run(
        [sys.executable, "-m", "convert", str(src), str(tmp_path / "out.pkl")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert only_inputs_left(tmp_path, "in.pth")
