"""Prove a converted file loads the way we claim: key by key, shape by shape, value by value.

Detectron2 matches checkpoint names to model names by suffix (``res5.0.conv1.weight`` ends up in
``roi_heads.res5.0.conv1.weight`` of the C4 model), and it silently skips a tensor whose shape does not
fit. So the only trustworthy check is to load the file through Detectron2's own checkpointer into the
real detector and look at what actually landed where.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from torch import nn

import detection  # noqa: F401  (registers Res5ROIHeadsExtraNorm, the C4 ROI head the configs name)
from convert.mapping import detectron2_model_key, torchvision_to_detectron2_key
from detection.backbone import SMALL_BACKBONE, STOCK_BACKBONE, apply_arch
from detection.config import load_detection_config
from detection.weights import fresh_category
from moco_d2.core.backbone import ARCHS, build_resnet
from moco_d2.core.errors import UserError


@dataclass
class ValidationResult:
    """What loading the converted file did to the target model."""

    target: str  # e.g. "Detectron2 R50-C4 (configs/voc_c4.yaml)"
    matched: int = 0  # model tensors loaded from the file with the source's exact values
    unmatched: Counter = field(default_factory=Counter)  # allowed category -> count of tensors left at init
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        left = ", ".join(f"{n} {cat}" for cat, n in self.unmatched.items()) or "none"
        status = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        lines = [f"validation into {self.target}: {status}", f"  matched: {self.matched} tensors, identical"]
        lines.append(f"  unmatched (allowed, trained from scratch): {left}")
        lines += [f"  problem: {p}" for p in self.problems[:10]]
        if len(self.problems) > 10:
            lines.append(f"  ... and {len(self.problems) - 10} more problems")
        return "\n".join(lines)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


def detectron2_cfg(arch: str, config_file: str | os.PathLike) -> CfgNode:
    """The detection config, with the ResNet shape taken from the checkpoint, on the CPU.

    Read like ``detection/train_net.py`` reads it (Detectron2's defaults plus this project's keys:
    ``DATASETS.VOC_CUSTOM``, ``MODEL.RANDOM_INIT``, ...), so every config train_net accepts validates
    here; its MODEL.WEIGHTS and RANDOM_INIT do not matter (the converted file is what gets loaded).
    A malformed or unknown-key file is a one-line UserError.
    """
    repo_copy = Path(__file__).resolve().parents[1] / config_file
    if not os.path.isfile(config_file) and not os.path.isabs(config_file) and repo_copy.is_file():
        config_file = repo_copy  # the repo's own configs also work when run from another directory
    if not os.path.isfile(config_file):
        raise UserError(f"detection config {str(config_file)!r} does not exist (pass --config-file)")
    if arch not in ARCHS:
        raise UserError(f"cannot validate a {arch!r} backbone; supported: {', '.join(ARCHS)}")
    try:
        cfg = load_detection_config(str(config_file)).clone()
    except (AttributeError, TypeError):  # yacs on a YAML list / scalar (load_config catches the rest)
        raise UserError(
            f"config file {str(config_file)!r} is not a YAML mapping of config keys (KEY: value)"
        ) from None
    cfg.defrost()
    backbones = (STOCK_BACKBONE, SMALL_BACKBONE)
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or cfg.MODEL.BACKBONE.NAME not in backbones:
        raise UserError(
            f"detection config {str(config_file)!r}: converted weights are validated in a C4 detector "
            f"(MODEL.META_ARCHITECTURE GeneralizedRCNN, MODEL.BACKBONE.NAME {' or '.join(backbones)}), "
            f"this config builds {cfg.MODEL.META_ARCHITECTURE} / {cfg.MODEL.BACKBONE.NAME}"
        )
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    apply_arch(cfg, arch)  # depth, widths, groups and -- for a small-image ResNet -- its stem
    cfg.freeze()
    return cfg


@dataclass
class DetectorTarget:
    """A Detectron2 detector built for one backbone arch; reusable across validations (loads overwrite it)."""

    model: nn.Module
    arch: str
    config_file: str
    cfg: CfgNode


def build_c4_model(arch: str, config_file: str | os.PathLike) -> DetectorTarget:
    """Build the detector the converted weights are meant for (build it once and reuse it: ~1 s for R50)."""
    cfg = detectron2_cfg(arch, config_file)
    try:
        model = build_model(cfg)
    except (KeyError, ValueError, AssertionError, TypeError, RuntimeError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(
            f"detection config {str(config_file)!r}: Detectron2 cannot build its model: {message}"
        ) from None
    model.eval()
    return DetectorTarget(model=model, arch=arch, config_file=str(config_file), cfg=cfg)


class _RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that remembers which checkpoint tensor it put into which model key.

    Detectron2 turns the file's arrays into tensors in place, renames them to model keys by its matching
    heuristics, and converts again before ``load_state_dict``. Both conversions see the same tensor
    objects, so object identity recovers the exact (checkpoint key -> model key) pairs it chose.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, save_to_disk=False)
        self.seen: list[dict] = []
        self.incompatible = None

    def _convert_ndarray_to_tensor(self, state_dict: dict) -> None:
        super()._convert_ndarray_to_tensor(state_dict)
        self.seen.append(dict(state_dict))

    def _load_model(self, checkpoint: dict):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible

    def matched_pairs(self) -> dict[str, str]:
        """checkpoint key -> model key, as Detectron2 matched them."""
        if len(self.seen) < 2:
            raise RuntimeError("this Detectron2 version did not apply matching heuristics to the file")
        file_keys = {id(t): k for k, t in self.seen[0].items()}
        model_keys = (
            self.model.state_dict().keys()
        )  # when nothing matches, Detectron2 passes the file through
        return {
            file_keys[id(t)]: mk for mk, t in self.seen[-1].items() if id(t) in file_keys and mk in model_keys
        }


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Detectron2 logs every skipped key as a warning; we report them ourselves, once."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def validate_detectron2(
    path: str | os.PathLike, source: dict[str, torch.Tensor], arch: str, target: DetectorTarget
) -> ValidationResult:
    """Load ``path`` into ``target.model`` with DetectionCheckpointer and compare with the torchvision ``source``.

    Every backbone and res5 parameter and BN buffer must come from its own source tensor, unchanged;
    only the RPN, the box predictor, res5's extra norm and BN step counters may stay unmatched.
    """
    spec = ARCHS[arch]
    name = f"R{spec.depth}" if spec.stock else arch
    result = ValidationResult(target=f"Detectron2 {name}-C4 ({target.config_file})")
    if target.arch != arch:
        result.problems.append(f"the validation model was built for {target.arch}, the checkpoint is {arch}")
        return result
    if not spec.basic_block and target.cfg.MODEL.RESNETS.STRIDE_IN_1X1:
        result.problems.append(
            "the config sets MODEL.RESNETS.STRIDE_IN_1X1=True, but torchvision ResNets stride in the 3x3 conv"
        )

    model = target.model
    checkpointer = _RecordingCheckpointer(model)
    try:
        with _quiet_loggers("fvcore", "detectron2"):
            checkpointer.load(str(path))
        pairs = checkpointer.matched_pairs()
    except (ValueError, RuntimeError, AssertionError) as exc:
        result.problems.append(f"Detectron2 could not load the file: {exc}")
        return result

    model_state = model.state_dict()
    # Expected placement of every source tensor, derived from the mapping rules, not from the loader.
    expected = {}
    for tv_key, tensor in source.items():
        d2_key = torchvision_to_detectron2_key(tv_key)
        if d2_key is not None:
            expected[d2_key] = (detectron2_model_key(d2_key), tensor)
    for d2_key, (model_key, tensor) in sorted(expected.items()):
        got = pairs.get(d2_key)
        if got is None:
            shape = tuple(model_state[model_key].shape) if model_key in model_state else "absent"
            result.problems.append(
                f"{d2_key} {tuple(tensor.shape)} was not loaded (model {model_key}: {shape})"
            )
        elif got != model_key:
            result.problems.append(f"{d2_key} was loaded into {got}, expected {model_key}")
        elif not _identical(model_state[model_key], tensor):
            result.problems.append(f"{model_key} differs from the source tensor {d2_key} after loading")
        else:
            result.matched += 1
    for key in sorted(checkpointer.seen[0].keys() - expected.keys()):
        result.problems.append(f"the file holds {key}, which is not a converted backbone tensor")

    loaded = set(pairs.values())
    for model_key in model_state:
        if model_key in loaded:
            continue
        category = fresh_category(model_key)
        if category is None:
            result.problems.append(f"model tensor {model_key} received no pretrained weights")
        else:
            result.unmatched[category] += 1
    inc = checkpointer.incompatible
    if inc is not None:
        for key in inc.unexpected_keys:
            result.problems.append(f"Detectron2 reported unexpected key {key}")
        for key, shape_ckpt, shape_model in inc.incorrect_shapes:
            result.problems.append(f"Detectron2 skipped {key}: shape {shape_ckpt} vs model {shape_model}")
    return result


def validate_torchvision(
    path: str | os.PathLike, source: dict[str, torch.Tensor], arch: str
) -> ValidationResult:
    """Load ``path`` as a user would (weights only, ``strict=False``): only ``fc`` may be missing.

    Not ``core.backbone.load_backbone``: this collects every problem of a file just written into a report
    (and counts the matched tensors) instead of stopping at the first mismatch.
    """
    result = ValidationResult(target=f"torchvision {arch}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_resnet(arch)
    incompatible = model.load_state_dict(state, strict=False)
    for key in incompatible.missing_keys:
        category = "classifier (fc)" if key.startswith("fc.") else fresh_category(key)
        if category is None:
            result.problems.append(f"model tensor {key} received no weights")
        else:
            result.unmatched[category] += 1
    result.problems += [f"unexpected key {k}" for k in incompatible.unexpected_keys]
    model_state = model.state_dict()
    for key, tensor in source.items():
        if key not in model_state or key in incompatible.missing_keys:
            continue
        if _identical(model_state[key], tensor):
            result.matched += 1
        else:
            result.problems.append(f"{key} differs from the source tensor after loading")
    return result
