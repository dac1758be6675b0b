"""Check, not assume, that a detector received every pretrained backbone tensor.

Builds the detector exactly as the fine-tuning run does (same config and overrides), loads the
converted weights with Detectron2's checkpointer, and compares every backbone and res5 tensor with
the source checkpoint's. The torchvision -> Detectron2 name mapping here is written independently
of ``convert/`` so that a wrong mapping there cannot hide.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from detection.weights import fresh_category
from moco_d2.core.backbone import load_resnet_state
from moco_d2.core.errors import UserError


class TransferCheckFailed(UserError):
    """The detector does not hold the pretrained weights: the detection numbers would be invalid."""


_STAGE = {
    "layer1": "backbone.res2",
    "layer2": "backbone.res3",
    "layer3": "backbone.res4",
    "layer4": "roi_heads.res5",
}
_BLOCK = re.compile(r"^(layer[1-4])\.(\d+)\.(.+)$")


def detectron2_name(tv_key: str) -> str:
    """Detectron2 C4 parameter name of a torchvision ResNet tensor (layer4 lives in the ROI head)."""
    if tv_key.startswith(("conv1.", "bn1.")):
        leaf = tv_key.split(".", 1)[1]
        return "backbone.stem.conv1." + ("weight" if tv_key.startswith("conv1.") else f"norm.{leaf}")
    m = _BLOCK.match(tv_key)
    if m is None:
        raise KeyError(tv_key)
    stage, block, rest = m.groups()
    prefix = f"{_STAGE[stage]}.{block}"
    for tv, d2 in (("downsample.0.", "shortcut."), ("downsample.1.", "shortcut.norm.")):
        if rest.startswith(tv):
            return f"{prefix}.{d2}{rest[len(tv) :]}"
    conv = re.match(r"^(conv|bn)(\d)\.(.+)$", rest)
    if conv is None:
        raise KeyError(tv_key)
    kind, idx, leaf = conv.groups()
    return f"{prefix}.conv{idx}.{leaf}" if kind == "conv" else f"{prefix}.conv{idx}.norm.{leaf}"


def is_pretrainable(d2_key: str) -> bool:
    """Detector tensors that a pretrained ResNet must provide: all but the fresh heads and BN counters."""
    return fresh_category(d2_key) is None


def check_transfer(
    source_ckpt: str, weights_pkl: str, config_file: str, opts: list[str], out_json: Path
) -> dict:
    """Compare every pretrained tensor with the built detector's; write and return a summary.

    Raises :class:`TransferCheckFailed` listing what is missing, unloaded or different.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    import detection  # noqa: F401  (registers the project's ROI heads)
    from detection.config import load_detection_config
    from detection.datasets import register_custom_datasets

    cfg = load_detection_config(config_file, [*opts, "MODEL.WEIGHTS", weights_pkl, "MODEL.DEVICE", "cpu"])
    register_custom_datasets(cfg)
    source = {
        k: v
        for k, v in load_resnet_state(source_ckpt).state_dict.items()
        if not k.endswith("num_batches_tracked")
    }
    model = build_model(cfg)
    for name in ("fvcore.common.checkpoint", "detectron2.checkpoint.detection_checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    DetectionCheckpointer(model).load(weights_pkl)
    state = model.state_dict()
    wanted = {k for k in state if is_pretrainable(k)}
    problems, compared = [], 0
    for tv_key, tensor in source.items():
        try:
            d2_key = detectron2_name(tv_key)
        except KeyError:
            problems.append(f"source tensor {tv_key} has no place in a C4 detector")
            continue
        if d2_key not in state:
            problems.append(f"{tv_key} -> {d2_key}: not in the detector")
            continue
        wanted.discard(d2_key)
        got = state[d2_key].detach().cpu()
        if got.shape != tensor.shape or not torch.equal(got.to(tensor.dtype), tensor):
            diff = (got.float() - tensor.float()).abs().max().item() if got.shape == tensor.shape else "shape"
            problems.append(f"{tv_key} -> {d2_key}: differs from the source (max |diff| {diff})")
            continue
        compared += 1
    problems += [f"detector tensor {k} has no pretrained source" for k in sorted(wanted)]
    if problems:
        raise TransferCheckFailed(
            f"{weights_pkl}: {len(problems)} pretrained tensor(s) not transferred into the detector, e.g. "
            + "; ".join(problems[:5])
        )
    result = {
        "source": source_ckpt,
        "weights": weights_pkl,
        "tensors_identical": compared,
        "backbone_tensors": sum(k.startswith("backbone.") for k in map(detectron2_name, source)),
        "res5_tensors": sum(k.startswith("roi_heads.res5.") for k in map(detectron2_name, source)),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    return result
