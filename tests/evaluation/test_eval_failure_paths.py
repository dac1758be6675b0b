"""Issue 16 for lincls and kNN: an OUTPUT_DIR that cannot be written, bad loader / device settings and a
missing checkpoint are one-line errors (exit 2), before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_lincls import make_image_folder, moco_checkpoint

from moco_d2.evaluation import knn, lincls

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["DATA.CROP_SIZE", "16", "DATA.RESIZE", "18", "DATA.NUM_WORKERS", "0", "TRAIN.DEVICE", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    moco_checkpoint(root / "ckpt.pth")
    return make_image_folder(root / "data"), root / "ckpt.pth"


@pytest.mark.parametrize("tool", ["knn", "lincls"])
@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["OUTPUT_DIR", "/proc/self/nope/out"], "OUTPUT_DIR '/proc/self/nope/out' cannot be created"),
        (["OUTPUT_DIR", "{tmp}/file/out"], "cannot be created: Not a directory"),
        (["DATA.NUM_WORKERS", "-1"], "DATA.NUM_WORKERS"),
        (["TRAIN.DEVICE", "cuda"], "TRAIN.DEVICE is 'cuda' but no CUDA GPU is available"),
        (["MODEL.WEIGHTS", "{tmp}/missing.pth"], "missing.pth"),
    ],
)
def test_eval_errors_are_one_line(setup, tmp_path, capsys, tool, opts, message):
    if opts == ["TRAIN.DEVICE", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    data, ckpt = setup
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out"
    argv = [*COMMON, "MODEL.WEIGHTS", str(ckpt), "DATA.ROOT", str(data), "OUTPUT_DIR", str(out)]
    argv += [o.replace("{tmp}", str(tmp_path)) for o in opts]
    if tool == "lincls":
        argv += ["SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "4"]
    with pytest.raises(SystemExit) as exc:
        (knn if tool == "knn" else lincls).main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (out / "results.json").exists() and not (out / "knn_results.json").exists()
