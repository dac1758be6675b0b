"""Turn a pretrained backbone checkpoint into Detectron2 weights (or a plain torchvision state dict).

The output is written to a temp file beside the target, validated there, and only then renamed into
place: a failed conversion or validation never leaves a file that looks usable.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import torch

from convert.mapping import to_detectron2_names
from moco_d2.core.backbone import ARCHS, BackboneState, check_arch, check_resnet_state, load_resnet_state
from moco_d2.core.errors import UserError
from moco_d2.core.io import atomic_write

if TYPE_CHECKING:  # importing Detectron2 costs a second, so convert.validate is imported on demand
    from convert.validate import DetectorTarget, ValidationResult

AUTHOR = "moco-d2 convert"
DEFAULT_CONFIG = "configs/voc_c4.yaml"
TARGETS = ("detectron2", "torchvision")


class ValidationError(UserError):
    """The converted file did not load exactly as intended; ``result`` says how."""

    def __init__(self, message: str, result: ValidationResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class ConvertReport:
    """What was read, what was written, and what validation found."""

    src: Path
    out: Path
    to: str
    source: str  # the recognised input format, e.g. "MoCo pretraining checkpoint (official format)"
    arch: str
    num_tensors: int  # tensors written
    num_dropped: int  # BN step counters left out (Detectron2 target only)
    validation: ValidationResult | None

    def summary(self) -> str:
        lines = [
            f"input:  {self.src} -- {self.source}, {self.arch}",
            f"output: {self.out} -- {self.num_tensors} tensors for {self.to}"
            + (f" ({self.num_dropped} num_batches_tracked dropped)" if self.num_dropped else ""),
        ]
        lines.append(self.validation.summary() if self.validation else "validation: skipped (--no-validate)")
        return "\n".join(lines)


def load_backbone(src: str | os.PathLike, arch: str | None = None) -> BackboneState:
    """Read ``src`` safely and make sure it holds a complete torchvision ResNet (of ``arch`` if given)."""
    name = f"checkpoint {str(src)!r}"
    if arch is not None and arch not in ARCHS:
        raise UserError(f"--arch {arch!r} is not supported; expected one of {', '.join(ARCHS)}")
    state = load_resnet_state(src)
    if arch is not None and state.arch is not None:
        check_arch(state, arch, name)
    arch = arch or state.arch
    if arch is None:
        raise UserError(f"{name}: cannot tell which torchvision ResNet its backbone is; pass --arch")
    check_resnet_state(state.state_dict, arch, name)
    state.arch = arch
    return state


def _to_numpy(name: str, tensor: torch.Tensor) -> np.ndarray:
    try:
        return tensor.detach().cpu().numpy()
    except TypeError:
        raise UserError(
            f"tensor {name!r} has dtype {tensor.dtype}, which numpy (and Detectron2) cannot hold"
        ) from None


def _check_out_path(src: Path, out: Path) -> None:
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"output {str(out)!r} is the input checkpoint; choose another output path")
    if out.is_dir():
        raise UserError(f"output {str(out)!r} is a directory; expected a file path")


def _write_validated(
    out: Path,
    suffix: str,
    write: Callable[[BinaryIO], None],
    check: Callable[[Path], ValidationResult] | None,
) -> ValidationResult | None:
    """Write to a temp file named ``*{suffix}`` beside ``out``, validate it, then rename it to ``out``."""
    results: list[ValidationResult] = []

    def validate(tmp: Path) -> None:
        result = check(tmp)
        results.append(result)
        if not result.ok:
            raise ValidationError(
                f"{str(out)!r} failed validation against {result.target} ({len(result.problems)} problems, "
                f"first: {result.problems[0]}); nothing was written",
                result,
            )

    atomic_write(out, write, what="output", check=validate if check is not None else None, suffix=suffix)
    return results[0] if results else None


def to_detectron2(
    src_path: str | os.PathLike,
    out_path: str | os.PathLike,
    validate: bool = True,
    config_file: str | os.PathLike = DEFAULT_CONFIG,
    arch: str | None = None,
    target: DetectorTarget | None = None,
) -> ConvertReport:
    """Write the Detectron2 pickle for ``src_path`` and (by default) prove it loads into the C4 detector.

    ``arch`` insists on a backbone architecture; ``target`` reuses an already built detector
    (``convert.validate.build_c4_model``) instead of building one from ``config_file``.
    """
    src, out = Path(src_path), Path(out_path)
    if out.suffix != ".pkl":
        raise UserError(
            f"output {str(out)!r} must end in .pkl: Detectron2 reads MODEL.WEIGHTS as a pickle only then"
        )
    _check_out_path(src, out)
    state = load_backbone(src, arch)
    d2_state = to_detectron2_names(state.state_dict)
    payload = {
        "model": {k: _to_numpy(k, v) for k, v in d2_state.items()},
        "__author__": AUTHOR,
        "matching_heuristics": True,
    }

    check = None
    if validate:
        from convert.validate import build_c4_model, validate_detectron2

        if target is None:
            target = build_c4_model(state.arch, config_file)

        def check(path: Path) -> ValidationResult:
            return validate_detectron2(path, state.state_dict, state.arch, target)

    result = _write_validated(out, ".pkl", lambda f: pickle.dump(payload, f, protocol=4), check)
    return ConvertReport(
        src=src,
        out=out,
        to="detectron2",
        source=state.source,
        arch=state.arch,
        num_tensors=len(d2_state),
        num_dropped=len(state.state_dict) - len(d2_state),
        validation=result,
    )


def to_torchvision(
    src_path: str | os.PathLike, out_path: str | os.PathLike, validate: bool = True, arch: str | None = None
) -> ConvertReport:
    """Write the backbone as a plain torchvision ResNet state dict (no ``fc``), for use outside Detectron2."""
    src, out = Path(src_path), Path(out_path)
    _check_out_path(src, out)
    state = load_backbone(src, arch)
    # clone: a view would make torch.save write its whole underlying storage
    tv_state = {k: v.detach().cpu().clone() for k, v in state.state_dict.items()}

    check = None
    if validate:
        from convert.validate import validate_torchvision

        def check(path: Path) -> ValidationResult:
            return validate_torchvision(path, state.state_dict, state.arch)

    result = _write_validated(out, ".tmp", lambda f: torch.save(tv_state, f), check)
    # Same fields as to_detectron2's report, other values: a helper would only rename the dataclass.
    return ConvertReport(
        src=src,
        out=out,
        to="torchvision",
        source=state.source,
        arch=state.arch,
        num_tensors=len(tv_state),
        num_dropped=0,
        validation=result,
    )


def default_output(src: str | os.PathLike, to: str = "detectron2") -> Path:
    """``ckpt.pth`` -> ``ckpt_detectron2.pkl`` / ``ckpt_torchvision.pth``, beside the input."""
    src = Path(src)
    return src.with_name(f"{src.stem}_{to}{'.pkl' if to == 'detectron2' else '.pth'}")
