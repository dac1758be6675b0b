"""The detection config: Detectron2's defaults plus the few keys this project adds.

Every YAML under ``configs/`` that targets Detectron2 is loaded through :func:`load_detection_config`,
so unknown keys, missing files and bad overrides are one-line :class:`UserError`s.
"""

from __future__ import annotations

from detectron2.config import CfgNode, get_cfg

from moco_d2.core.config import load_config


def add_detection_config(cfg: CfgNode) -> CfgNode:
    """Add this project's keys (all with neutral defaults) to a Detectron2 config, in place."""
    # Extra VOC-format datasets registered from the config, no code needed. Each entry is a dict:
    #   {"name": str, "root": dir with Annotations/ ImageSets/Main/ JPEGImages/, "split": str,
    #    "classes": [class names, in label order], "year": 2007 (11-point AP, default) or 2012}
    cfg.DATASETS.VOC_CUSTOM = []
    # True only for the from-scratch baseline: an empty MODEL.WEIGHTS is then intentional.
    cfg.MODEL.RANDOM_INIT = False
    # After evaluation, draw this many test images with their detections into OUTPUT_DIR/vis/.
    cfg.TEST.VIS_NUM_IMAGES = 4
    cfg.TEST.VIS_SCORE_THRESH = 0.5
    # Stride of the small-image stem (one 3x3 conv, no max-pool) that MODEL.BACKBONE.NAME
    # "build_small_resnet_backbone" builds (detection/backbone.py); Detectron2's own stem ignores it.
    cfg.MODEL.RESNETS.STEM_STRIDE = 2
    return cfg


def detection_defaults() -> CfgNode:
    """Detectron2's default config extended with :func:`add_detection_config`."""
    return add_detection_config(get_cfg())


def load_detection_config(config_file: str | None, opts: list[str] | None = None) -> CfgNode:
    """Resolve ``config_file`` (with its ``_BASE_`` chain) plus ``KEY VALUE`` overrides; frozen."""
    return load_config(detection_defaults(), config_file, opts)
