"""Loading pretrained weights into the detector, with proof that they were actually loaded.

Converted MoCo weights name only backbone layers (``stem.*``, ``res2.*`` ... ``res5.*``) and rely on
Detectron2's matching heuristics to land in ``backbone.*`` and ``roi_heads.res5.*``. A mismatch
(wrong depth, wrong converter output, a classification checkpoint) would otherwise silently
leave the backbone randomly initialised, so this checkpointer reports what was loaded and refuses
weights that leave any backbone tensor untouched.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from urllib.parse import urlparse

from detectron2.checkpoint import DetectionCheckpointer

from detection.weights import FRESH_PREFIXES
from moco_d2.core.errors import UserError

logger = logging.getLogger(__name__)

# Heads that are never in pretrained backbone weights and are trained from scratch.


@dataclass
class LoadReport:
    """Which model tensors a checkpoint provided (``num_batches_tracked`` counters are ignored)."""

    loaded: list[str] = field(default_factory=list)
    not_loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # checkpoint tensors that matched nothing

    def count(self, prefix: str) -> tuple[int, int]:
        """(loaded, total) among model tensors whose name starts with ``prefix``."""
        loaded = sum(k.startswith(prefix) for k in self.loaded)
        return loaded, loaded + sum(k.startswith(prefix) for k in self.not_loaded)

    def summary(self) -> str:
        b, bt = self.count("backbone.")
        r5 = [
            k
            for k in self.loaded + self.not_loaded
            if k.startswith("roi_heads.res5.") and not k.startswith("roi_heads.res5.norm.")
        ]
        r5_loaded = sum(k in set(self.loaded) for k in r5)
        fresh = sorted({p.rstrip(".") for p in FRESH_PREFIXES for k in self.not_loaded if k.startswith(p)})
        other = [k for k in self.not_loaded if not k.startswith(FRESH_PREFIXES)]
        return (
            f"loaded {len(self.loaded)}/{len(self.loaded) + len(self.not_loaded)} model tensors "
            f"(backbone {b}/{bt}, roi_heads.res5 blocks {r5_loaded}/{len(r5)}); "
            f"initialised fresh: {fresh + other[:5] + (['...'] if len(other) > 5 else [])}; "
            f"unused checkpoint tensors: {len(self.unused)}"
        )


def is_local_path(path: str) -> bool:
    """False for URLs and Detectron2's ``detectron2://`` model-zoo names."""
    return urlparse(path).scheme in ("", "file")


def check_weights_path(path: str) -> None:
    """A missing local MODEL.WEIGHTS file is a one-line UserError."""
    if path and is_local_path(path) and not os.path.isfile(urlparse(path).path):
        raise UserError(
            f"MODEL.WEIGHTS {path!r} does not exist; expected a Detectron2 .pkl written by "
            f"`python -m convert CKPT OUT.pkl` (or a Detectron2 .pth checkpoint)"
        )


class VerifiedCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that logs matched/unmatched tensors and verifies the backbone loaded."""

    def __init__(self, model, save_dir: str = "", *, require_backbone: bool = True, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.require_backbone = require_backbone
        self.last_report: LoadReport | None = None
        self._source = ""

    def _load_file(self, filename: str):
        self._source = filename
        try:
            return super()._load_file(filename)
        except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, AttributeError) as exc:
            first_line = (str(exc).splitlines() or [""])[0]
            raise UserError(
                f"MODEL.WEIGHTS {filename!r} is not a readable Detectron2 checkpoint "
                f"(.pkl from `python -m convert`, or a .pth saved by train_net): {type(exc).__name__}: {first_line}"
            ) from None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        skipped = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
        names = [k for k in self.model.state_dict() if not k.endswith("num_batches_tracked")]
        names = [k for k in names if k not in ("pixel_mean", "pixel_std")]
        report = LoadReport(
            loaded=[k for k in names if k not in skipped],
            not_loaded=[k for k in names if k in skipped],
            unused=[k for k in incompatible.unexpected_keys if not k.endswith("num_batches_tracked")],
        )
        self.last_report = report
        logger.info(f"weights {self._source}: {report.summary()}")
        backbone_missing = [k for k in report.not_loaded if k.startswith("backbone.")]
        if self.require_backbone and backbone_missing:
            shapes = {k: (tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes}
            example = backbone_missing[0]
            why = (
                f"shape {shapes[example][0]} in the file vs {shapes[example][1]} in the model"
                if example in shapes
                else "absent"
            )
            raise UserError(
                f"MODEL.WEIGHTS {self._source!r}: {len(backbone_missing)} of {report.count('backbone.')[1]} backbone "
                f"tensors were not loaded (e.g. {example}: {why}); the weights do not fit this "
                f"model - check MODEL.RESNETS.DEPTH and that the file is a converted backbone"
            )
        return incompatible
