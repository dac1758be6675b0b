"""``torchrun --nproc_per_node=2 -m moco_d2.evaluation.lincls`` on CPU (gloo): DDP over fc only, exact val counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_lincls import _backbone, make_image_folder, moco_checkpoint, opts

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_two_processes(tmp_path: Path):
    data = make_image_folder(tmp_path / "data", n_train=4, n_val=3)  # 12 train, 9 val: val splits 5 + 4
    pretrained = moco_checkpoint(tmp_path / "moco.pth")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "moco_d2.evaluation.lincls", "--config-file", "configs/lincls/lincls_in1k.yaml"]
    cmd += opts(data, out, **{"MODEL.WEIGHTS": tmp_path / "moco.pth"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["sanity_check"] == "passed"
    # 9 validation images counted once each (a padding sampler would count 10).
    for key in ("top1", "top5", "best_top1"):
        hits = results[key] * 9 / 100
        assert abs(hits - round(hits)) < 1e-6, (key, results[key])
    final = torch.load(out / "model_final.pth", weights_only=True)
    backbone = _backbone(final["state_dict"])
    assert all(torch.equal(backbone[k], v) for k, v in pretrained.items())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/epoch"] for r in records if "val/top1" in r] == [1.0, 2.0]  # written by rank 0 only
    assert (out / "log.rank1.txt").exists()
