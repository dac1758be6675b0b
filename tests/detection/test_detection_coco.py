"""COCO transfer setting end to end: configs/coco_c4.yaml (Mask R-CNN C4 with the extra res5 norm) on a
tiny dataset in the built-in COCO 2017 layout, through train_net, Detectron2's own COCO registration
and the COCO evaluator (box and mask AP with pycocotools)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from toy_data import write_toy_coco

ROOT = Path(__file__).resolve().parents[2]


def test_mask_rcnn_c4_trains_and_evaluates_box_and_mask_ap(tmp_path: Path) -> None:
    write_toy_coco(str(tmp_path / "datasets"), {"train2017": 4, "val2017": 2})
    out = tmp_path / "out"
    opts = [
        *("MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out), "MODEL.RANDOM_INIT", "True"),
        *("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"),
        *("INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128"),
        *("INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"),
        *("SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)"),
        *("SOLVER.WARMUP_ITERS", "1", "SOLVER.BASE_LR", "0.01"),
        *("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32"),
        *("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8"),
        *("MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50"),
        *("MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "10"),
        *("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"),  # an untrained head still yields detections
        *("TEST.PRECISE_BN.NUM_ITER", "1", "TEST.VIS_NUM_IMAGES", "1", "DATALOADER.NUM_WORKERS", "0"),
    ]
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets")}
    cmd = [sys.executable, "detection/train_net.py", "--config-file", "configs/coco_c4.yaml", *opts]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "coco_2017_val" and metrics["iteration"] == 2
    results = metrics["results"]["coco_2017_val"]
    for task in ("bbox", "segm"):  # COCO-style AP, AP50, AP75 for boxes and masks
        assert {"AP", "AP50", "AP75"} <= set(results[task]), results.keys()
        assert all(v is None or 0.0 <= v <= 100.0 for v in results[task].values())
    assert metrics["AP"] == results["bbox"]["AP"]
    assert (out / "model_final.pth").is_file()
