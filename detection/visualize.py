"""Draw a few test images with the model's detections (Detectron2's Visualizer)."""

from __future__ import annotations

import copy
import os

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.evaluation.evaluator import inference_context
from detectron2.utils.visualizer import Visualizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def draw_detections(cfg: CfgNode, model: nn.Module, dataset_name: str, out_dir: str) -> list[str]:
    """Run ``model`` on the first ``TEST.VIS_NUM_IMAGES`` images of ``dataset_name`` and save drawings.

    Detections scoring at least ``TEST.VIS_SCORE_THRESH`` are drawn with their class names;
    returns the written paths (``out_dir/<image id>.jpg``).
    """
    if cfg.TEST.VIS_NUM_IMAGES <= 0:
        return []
    if isinstance(model, DistributedDataParallel):
        model = model.module
    dicts = DatasetCatalog.get(dataset_name)[: cfg.TEST.VIS_NUM_IMAGES]
    metadata = MetadataCatalog.get(dataset_name)
    mapper = DatasetMapper(cfg, is_train=False)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    with inference_context(model), torch.no_grad():
        for record in dicts:
            instances = model([mapper(copy.deepcopy(record))])[0]["instances"].to("cpu")
            instances = instances[instances.scores >= cfg.TEST.VIS_SCORE_THRESH]
            image = utils.read_image(record["file_name"], format="RGB")
            drawing = Visualizer(image, metadata).draw_instance_predictions(instances)
            path = os.path.join(out_dir, f"{os.path.basename(str(record['image_id']))}.jpg")
            drawing.save(path)
            paths.append(path)
    return paths
