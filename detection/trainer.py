"""The detection trainer: Detectron2's ``DefaultTrainer`` extended through its own hooks.

What it adds to the stock trainer: the VOC evaluator with per-class AP, ``metrics.json`` with
the final numbers, drawings of a few test images after each evaluation, and a checkpointer that
verifies pretrained weights really landed in the backbone. Training itself (SyncBN, precise BN
before evaluation, LR schedule, checkpointing, resume) is Detectron2's.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections import OrderedDict

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter, get_event_storage
from torch import nn

from detection.checkpoint import VerifiedCheckpointer
from detection.evaluation import VOCDetectionEvaluator
from detection.visualize import draw_detections
from moco_d2.core.errors import UserError
from moco_d2.core.io import write_json_atomic

logger = logging.getLogger(__name__)


class _HideUserErrorTraceback(logging.Filter):
    """Detectron2's training loop logs every exception with its traceback before re-raising it; a
    :class:`UserError` (e.g. a checkpoint that cannot be written) is reported in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


_train_loop_logger = logging.getLogger("detectron2.engine.train_loop")
if not any(isinstance(f, _HideUserErrorTraceback) for f in _train_loop_logger.filters):
    _train_loop_logger.addFilter(_HideUserErrorTraceback())

METRICS_FILE = "metrics.json"  # final evaluation numbers (one JSON object)
TRAIN_LOG_FILE = "train_log.json"  # Detectron2's per-period training scalars (JSON lines)


def summarize_results(cfg: CfgNode, results: dict, iteration: int | None) -> dict:
    """The ``metrics.json`` object: headline numbers of the first test set plus everything else.

    ``AP``/``AP50``/``AP75`` and ``per_class_AP50`` come from the first dataset in DATASETS.TEST
    ("bbox" task); ``results`` keeps every dataset's full evaluator output.
    """
    first = cfg.DATASETS.TEST[0]
    bbox = results.get(first, {}).get("bbox", {})
    classes = MetadataCatalog.get(first).get("thing_classes", [])
    summary = {
        "dataset": first,
        "iteration": iteration,
        "weights": cfg.MODEL.WEIGHTS,
        "AP": bbox.get("AP"),
        "AP50": bbox.get("AP50"),
        "AP75": bbox.get("AP75"),
        "per_class_AP50": {c: bbox[f"AP50-{c}"] for c in classes if f"AP50-{c}" in bbox},
        "results": results,
    }
    return summary


def _strict_json(obj):
    """NaN (e.g. AP of a class absent from the test set) becomes null, keeping the file valid JSON."""
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_strict_json(obj: dict, path: str) -> None:
    """Strict JSON (NaN as null), written atomically."""
    write_json_atomic(_strict_json(obj), path, allow_nan=False)


def _completed_iterations(cfg: CfgNode) -> int | None:
    """Training iterations done when evaluation runs; None outside training (e.g. --eval-only)."""
    try:
        storage = get_event_storage()
    except AssertionError:  # no EventStorage: evaluation outside training
        return None
    # During training storage.iter is the iteration just run; after training it equals MAX_ITER.
    return min(storage.iter + 1, cfg.SOLVER.MAX_ITER)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with VOC per-class evaluation, metrics.json, drawings and verified weights."""

    def build_hooks(self):
        # DefaultTrainer created a plain DetectionCheckpointer just before calling build_hooks; swap
        # in the verifying one with the same arguments so the checkpoint hook saves through it too.
        self.checkpointer = VerifiedCheckpointer(
            self.checkpointer.model,
            self.cfg.OUTPUT_DIR,
            require_backbone=not self.cfg.MODEL.RANDOM_INIT,
            trainer=weakref.proxy(self),
        )
        return super().build_hooks()

    def build_writers(self):
        # metrics.json is reserved for the final evaluation numbers; the training log goes elsewhere.
        return [
            CommonMetricPrinter(self.max_iter),
            JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, TRAIN_LOG_FILE)),
            TensorboardXWriter(self.cfg.OUTPUT_DIR),
        ]

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if kind == "pascal_voc":
            return VOCDetectionEvaluator(dataset_name)
        if kind == "coco":
            return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"))
        raise UserError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type {kind!r}); use VOC or COCO data"
        )

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators=None) -> OrderedDict:
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            per_dataset = results if len(cfg.DATASETS.TEST) > 1 else {cfg.DATASETS.TEST[0]: results}
            summary = summarize_results(cfg, per_dataset, _completed_iterations(cfg))
            write_strict_json(summary, os.path.join(cfg.OUTPUT_DIR, METRICS_FILE))
            logger.info(
                f"{summary['dataset']}: AP {summary['AP']}, AP50 {summary['AP50']}, AP75 {summary['AP75']} "
                f"-> {os.path.join(cfg.OUTPUT_DIR, METRICS_FILE)}"
            )
            for name in cfg.DATASETS.TEST:
                draw_detections(cfg, model, name, os.path.join(cfg.OUTPUT_DIR, "vis", name))
        comm.synchronize()
        return results
