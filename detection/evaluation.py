"""PASCAL VOC box AP with per-class numbers.

Detectron2's ``PascalVOCDetectionEvaluator`` reports only the class-averaged AP/AP50/AP75. The
MoCo tables also need per-class AP50, so this evaluator computes the same quantities (VOC07
11-point AP for year 2007 data, area under the PR curve for 2012, each averaged over IoU
0.50:0.95) and keeps the per-class values: ``AP50-<class>`` and ``AP-<class>`` keys next to
``AP``, ``AP50``, ``AP75``. It plugs into Detectron2 as an ordinary ``DatasetEvaluator``.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections import OrderedDict, defaultdict

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from detection.datasets import read_split

IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a precision/recall curve: 11-point interpolation (VOC07) or the exact area (VOC10+)."""
    if use_07_metric:
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
        return float(np.mean(points))
    r = np.concatenate(([0.0], recall, [1.0]))
    p = np.concatenate(([0.0], precision, [0.0]))
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision envelope (monotone non-increasing)
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def class_ap(
    gt: dict[str, tuple[np.ndarray, np.ndarray]],
    detections: list[tuple[str, float, np.ndarray]],
    iou_threshold: float,
    use_07_metric: bool,
) -> float | None:
    """AP of one class, VOC devkit rules: greedy matching by score, difficult boxes ignored.

    ``gt`` maps image id -> (boxes [N, 4] in VOC 1-based inclusive pixels, difficult flags [N]);
    ``detections`` are (image id, score, box) in the same coordinates. None when the class has
    no non-difficult ground truth (its AP is undefined).
    """
    num_positives = sum(int((~difficult).sum()) for _, difficult in gt.values())
    if num_positives == 0:
        return None
    order = sorted(range(len(detections)), key=lambda i: -detections[i][1])
    used = {image_id: np.zeros(len(boxes), dtype=bool) for image_id, (boxes, _) in gt.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, i in enumerate(order):
        image_id, _, box = detections[i]
        boxes, difficult = gt.get(image_id, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1.0, 0, None)
        ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1.0, 0, None)
        inter = iw * ih
        area_det = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
        area_gt = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
        iou = inter / (area_det + area_gt - inter)
        j = int(iou.argmax())
        if iou[j] > iou_threshold:
            if difficult[j]:
                continue  # neither a true nor a false positive
            if not used[image_id][j]:
                tp[rank], used[image_id][j] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / num_positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def read_voc_ground_truth(dirname: str, split: str, classes: list[str]) -> list[dict[str, tuple]]:
    """Per class: image id -> (boxes, difficult flags), read from the split's XML annotations."""
    index = {c: i for i, c in enumerate(classes)}
    per_class: list[dict[str, list]] = [defaultdict(lambda: ([], [])) for _ in classes]
    image_ids = read_split(dirname, split)
    for image_id in image_ids:
        tree = ET.parse(os.path.join(dirname, "Annotations", image_id + ".xml"))
        for obj in tree.findall("object"):
            c = index.get(obj.findtext("name", "").strip())
            if c is None:
                continue
            bb = obj.find("bndbox")
            boxes, difficult = per_class[c][image_id]
            boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            difficult.append(int(obj.findtext("difficult", "0") or 0) == 1)
    result = []
    for c in range(len(classes)):
        gt = {i: (np.zeros((0, 4)), np.zeros(0, dtype=bool)) for i in image_ids}
        for image_id, (boxes, difficult) in per_class[c].items():
            gt[image_id] = (
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                np.asarray(difficult, dtype=bool),
            )
        result.append(gt)
    return result


class VOCDetectionEvaluator(DatasetEvaluator):
    """VOC AP/AP50/AP75 (mean over classes) plus ``AP50-<class>`` and ``AP-<class>`` for each class.

    Classes without ground truth in the split are left out of the means and reported as NaN.
    """

    def __init__(self, dataset_name: str):
        meta = MetadataCatalog.get(dataset_name)
        self._dataset_name = dataset_name
        self._dirname, self._split = meta.dirname, meta.split
        self._classes = list(meta.thing_classes)
        self._use_07_metric = meta.year == 2007
        self._logger = logging.getLogger(__name__)

    def reset(self) -> None:
        self._detections: dict[int, list] = defaultdict(list)  # class id -> [(image id, score, box)]

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            instances = out["instances"].to(torch.device("cpu"))
            boxes = instances.pred_boxes.tensor.numpy().astype(np.float64)
            boxes[:, :2] += 1.0  # back to VOC's 1-based pixel coordinates (inverse of the loader)
            for box, score, c in zip(boxes, instances.scores.tolist(), instances.pred_classes.tolist()):
                self._detections[c].append((inp["image_id"], float(score), box))

    def evaluate(self) -> OrderedDict:
        gathered = comm.gather(dict(self._detections), dst=0)
        if not comm.is_main_process():
            return OrderedDict()
        detections: dict[int, list] = defaultdict(list)
        for per_rank in gathered:
            for c, dets in per_rank.items():
                detections[c].extend(dets)
        metric = "VOC07 11-point" if self._use_07_metric else "VOC area"
        self._logger.info(f"Evaluating {self._dataset_name} with the {metric} AP over IoU 0.50:0.95")
        ground_truth = read_voc_ground_truth(self._dirname, self._split, self._classes)
        aps = np.full((len(self._classes), len(IOU_THRESHOLDS)), np.nan)
        for c in range(len(self._classes)):
            for t, thr in enumerate(IOU_THRESHOLDS):
                ap = class_ap(ground_truth[c], detections.get(c, []), thr, self._use_07_metric)
                aps[c, t] = np.nan if ap is None else 100.0 * ap
        has_gt = ~np.isnan(aps[:, 0])
        if not has_gt.any():
            self._logger.warning(f"{self._dataset_name}: no ground-truth boxes, AP is undefined")
        mean = aps[has_gt].mean(axis=0) if has_gt.any() else np.full(len(IOU_THRESHOLDS), np.nan)
        bbox = {"AP": float(mean.mean()), "AP50": float(mean[0]), "AP75": float(mean[5])}
        for c, name in enumerate(self._classes):
            bbox[f"AP50-{name}"] = float(aps[c, 0])
        for c, name in enumerate(self._classes):
            bbox[f"AP-{name}"] = float(aps[c].mean())
        return OrderedDict(bbox=bbox)
