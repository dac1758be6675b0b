"""kNN / lincls evaluation skip an unreadable image (never substitute the next one) and report it.

Issue 16: ``knn_results.json`` said ``num_val: 20`` for 19 distinct images (the corrupt one was replaced by
its neighbour, counted twice) and named no skipped file.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_lincls import make_image_folder, moco_checkpoint, opts
from torch import nn

from moco_d2.core.images import BadDataError, SafeImageFolder, build_eval_transform
from moco_d2.evaluation import knn, lincls
from moco_d2.evaluation.features import make_eval_loader
from moco_d2.evaluation.knn import knn_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _data_with_bad_val(root: Path) -> Path:
    data = make_image_folder(root, n_train=2, n_val=3)  # 6 train, 9 val images
    (data / "val" / "class1" / "0.png").write_bytes(b"not a png")
    return data


def _knn_argv(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config-file", "configs/lincls/knn_in1k.yaml", "MODEL.WEIGHTS", str(ckpt), "DATA.ROOT", str(data),
        "OUTPUT_DIR", str(out), "DATA.CROP_SIZE", "16", "DATA.RESIZE", "18", "DATA.BATCH_SIZE", "4",
        "DATA.NUM_WORKERS", "0", "TRAIN.DEVICE", "cpu", "KNN.K", "3", "DATA.MAX_BAD_FRACTION", "0.2", *extra,
    ]  # fmt: skip


def test_knn_cli_counts_distinct_images_and_reports_the_skipped_one(tmp_path: Path):
    data = _data_with_bad_val(tmp_path / "data")
    moco_checkpoint(tmp_path / "ckpt.pth")
    res = knn.main(_knn_argv(tmp_path / "ckpt.pth", data, tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "knn_results.json").read_text()) == res
    assert (res["num_train"], res["num_val"], res["num_skipped"]) == (6, 8, 1)
    assert res["skipped"] == [str(data / "val" / "class1" / "0.png")]
    assert "1 unreadable image(s) skipped" in (tmp_path / "out" / "log.txt").read_text()


def test_knn_cli_too_many_unreadable_is_one_line(tmp_path: Path, capsys):
    data = _data_with_bad_val(tmp_path / "data")
    moco_checkpoint(tmp_path / "ckpt.pth")
    with pytest.raises(SystemExit) as info:
        knn.main(_knn_argv(tmp_path / "ckpt.pth", data, tmp_path / "out", "DATA.MAX_BAD_FRACTION", "0.1"))
    assert info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 of 9 images" in err and "MAX_BAD_FRACTION" in err


def test_lincls_results_report_the_skipped_validation_image(tmp_path: Path):
    data = _data_with_bad_val(tmp_path / "data")
    moco_checkpoint(tmp_path / "moco.pth")
    argv = ["--config-file", "configs/lincls/lincls_in1k.yaml"]
    argv += opts(data, tmp_path / "out", **{"MODEL.WEIGHTS": tmp_path / "moco.pth", "SOLVER.EPOCHS": 1})
    res = lincls.main([*argv, "SOLVER.STEPS", "[]", "DATA.MAX_BAD_FRACTION", "0.2"])
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == res
    assert (res["num_val"], res["num_skipped"]) == (8, 1)
    assert res["skipped"] == [str(data / "val" / "class1" / "0.png")]
    hits = res["top1"] * 8 / 100  # a fraction of the 8 readable images, not of 9
    assert abs(hits - round(hits)) < 1e-6


class _Pixels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def _folders(root: Path) -> tuple[SafeImageFolder, SafeImageFolder]:
    tf = build_eval_transform(8, 8)
    return (
        SafeImageFolder(root / "train", tf, max_bad_fraction=0.5),
        SafeImageFolder(root / "val", tf, max_bad_fraction=0.5),
    )


def _make_bad_folders(root: Path) -> None:
    make_image_folder(root, n_train=3, n_val=3, size=8)  # 9 + 9 images
    for rel in ("train/class0/1.png", "val/class2/2.png", "val/class1/0.png"):
        (root / rel).write_bytes(b"\x89PNG broken")


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from moco_d2.core.distributed import cleanup, init_distributed

    init_distributed("cpu")
    train, val = _folders(Path(root))
    res = knn_evaluate(
        _Pixels(), make_eval_loader(train, 2, 0), make_eval_loader(val, 2, 1), 3, k=3, t=0.1, device="cpu"
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    cleanup()


def test_two_processes_skip_each_unreadable_image_once(tmp_path: Path):
    _make_bad_folders(tmp_path / "data")
    train, val = _folders(tmp_path / "data")
    one = knn_evaluate(
        _Pixels(), make_eval_loader(train, 2, 0), make_eval_loader(val, 2, 0), 3, k=3, t=0.1, device="cpu"
    )
    assert (one["num_train"], one["num_val"], one["num_skipped"]) == (8, 7, 3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _worker, args=(2, port, str(tmp_path / "data"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res.pop("skipped") == one["skipped"] and len(one["skipped"]) == 3
        assert res == pytest.approx({k: v for k, v in one.items() if k != "skipped"})


def test_every_unreadable_is_over_the_limit_across_shards(tmp_path: Path):
    """Each rank / worker sees only its shard; the limit applies to the total skipped."""
    _make_bad_folders(tmp_path / "data")
    train, val = _folders(tmp_path / "data")
    val.max_bad_fraction = 0.2  # each of the 2 workers meets 1 of the 2 bad files (1/9 passes), 2/9 does not
    with pytest.raises(BadDataError, match="2 of 9 images"):
        knn_evaluate(
            _Pixels(), make_eval_loader(train, 2, 0), make_eval_loader(val, 1, 2), 3, k=3, t=0.1, device="cpu"
        )
