"""Loading pretrained weights into the detector, with proof that they were actually loaded.

Converted MoCo weights name only backbone layers (``stem.*``, ``res2.*`` ... ``res5.*``) and rely on
Detectron2's matching heuristics to land in ``backbone.*`` and ``roi_heads.res5.*``. A mismatch
(wrong depth, wrong converter output, a classification checkpoint) would otherwise silently
leave the backbone randomly initialised, so this checkpointer reports what was loaded and refuses
weights that leave any backbone tensor untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer

from detection.safe_load import load_restricted_pickle, load_torch_weights, refuse, refused_global
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


# Keys only a pretraining (MoCo / lincls) checkpoint or a torchvision state dict has at its top level.
_PRETRAIN_KEYS = ("epoch", "state_dict", "optimizer", "queue", "arch", "kind")


def _pretraining_keys(loaded: dict) -> list[str]:
    """Top-level keys that mark ``loaded`` as an unconverted pretraining/torchvision checkpoint."""
    if "model" in loaded:
        return []
    keys = [str(k) for k in loaded]
    marked = [k for k in keys if k in _PRETRAIN_KEYS]
    if not marked and any(k.removeprefix("module.").startswith(("encoder_q.", "layer1.")) for k in keys):
        marked = keys[:3]
    return marked


def write_atomic(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(f)`` into a new temp file beside ``path``, fsync, then ``os.replace`` it over ``path``.

    A crash or a full disk leaves the old ``path`` (or none), never a torn one; the temp file is
    removed on failure. The file gets the usual mode (0o666 minus the umask).
    """
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # write_atomic's temp names (pid inside)


def remove_stale_temp_files(directory: str) -> None:
    """Delete the temp files of :func:`write_atomic` whose writer is gone (a kill -9 mid-save)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _TMP_RE.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            logger.warning(
                "removed %s, a temp file left by an interrupted save", os.path.join(directory, name)
            )


class VerifiedCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that logs matched/unmatched tensors and verifies the backbone loaded.

    It also loads without running code (restricted unpickler for ``.pkl``, ``weights_only=True``
    for ``.pth``) and saves atomically (temp file, fsync, rename), ``last_checkpoint`` included.
    """

    def __init__(self, model, save_dir: str = "", *, require_backbone: bool = True, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        if save_dir and self.save_to_disk:  # the main process, before it saves anything
            remove_stale_temp_files(save_dir)
        self.require_backbone = require_backbone
        self.last_report: LoadReport | None = None
        self._source = ""
        self._label = "MODEL.WEIGHTS"

    # ------------------------------------------------------------------ loading

    def resume_or_load(self, path: str, *, resume: bool = True):
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        last = os.path.join(self.save_dir, "last_checkpoint")
        target = self.get_checkpoint_file()
        if not os.path.isfile(target):
            raise UserError(
                f"{last} names {os.path.basename(target)!r}, which does not exist in {self.save_dir!r}; "
                "expected the newest model_*.pth of the run (fix the file, or start a new OUTPUT_DIR)"
            )
        self._label = f"checkpoint (from {last})"
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._label = "MODEL.WEIGHTS"

    def _load_file(self, filename: str):
        self._source = filename
        try:
            if filename.endswith(".pkl"):
                return self._detectron2_pickle(filename, load_restricted_pickle(filename))
            if filename.endswith(".pyth"):  # pycls, as in DetectionCheckpointer, but weights-only
                data = self._torch_load(filename)
                state = {
                    k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
                }
                return {"model": state, "__author__": "pycls", "matching_heuristics": True}
            return super()._load_file(filename)  # reads through self._torch_load
        except UserError:
            raise
        except Exception as exc:
            refused = refused_global(exc)
            if refused is not None:
                raise refuse(self._label, filename, refused) from None
            first_line = (str(exc).splitlines() or [""])[0][:200]
            raise UserError(
                f"{self._label} {filename!r} is not a readable Detectron2 checkpoint "
                f"(.pkl from `python -m convert`, or a .pth saved by train_net): {type(exc).__name__}: {first_line}"
            ) from None

    def _detectron2_pickle(self, filename: str, data: Any) -> dict:
        """What ``DetectionCheckpointer`` makes of a .pkl (model-zoo or Caffe2 layout)."""
        if not isinstance(data, dict):
            raise UserError(f"{self._label} {filename!r} holds a {type(data).__name__}, expected a dict")
        if "model" in data and "__author__" in data:
            self.logger.info(f"Reading a file from '{data['__author__']}'")
            return data
        if "blobs" in data:
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f: str):
        loaded = load_torch_weights(f)
        if not isinstance(loaded, dict):
            raise UserError(
                f"{self._label} {f!r} holds a {type(loaded).__name__}, expected a checkpoint dict"
            )
        marked = _pretraining_keys(loaded)
        if marked:
            stem = os.path.splitext(f)[0]
            raise UserError(
                f"{self._label} {f!r} is a pretraining checkpoint (keys {marked}), not Detectron2 weights; "
                f"convert it first: `make convert CKPT={f}` (writes {stem}.pkl), then pass MODEL.WEIGHTS {stem}.pkl"
            )
        return loaded

    # ------------------------------------------------------------------ saving

    def save(self, name: str, **kwargs: Any) -> None:
        """Like ``Checkpointer.save``, but atomic: a failed write leaves the previous checkpoint as it was."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        self._write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        self._write(path, lambda f: f.write(last_filename_basename.encode()))

    def _write(self, path: str, write: Callable[[IO[bytes]], Any]) -> None:
        try:
            write_atomic(path, write)
        except OSError as exc:
            previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
            kept = (
                f"the previous checkpoint {os.path.basename(previous)!r} is intact"
                if previous and os.path.isfile(previous)
                else "nothing was overwritten"
            )
            raise UserError(
                f"cannot write checkpoint {path!r}: {exc.strerror or exc}; {kept}, no partial file was left "
                "(free space / fix OUTPUT_DIR, then continue with --resume)"
            ) from None

    def _load_model(self, checkpoint):
        state = checkpoint.get("model")
        if not isinstance(state, dict) or not state:
            got = "an empty dict" if isinstance(state, dict) else type(state).__name__
            raise UserError(
                f"{self._label} {self._source!r} holds no tensors ('model' is {got}); expected the "
                "backbone weights written by `python -m convert` (or a Detectron2 .pth checkpoint)"
            )
        try:
            incompatible = super()._load_model(checkpoint)
        except ValueError as exc:  # fvcore: "Unsupported type found in checkpoint! <key>: <type>"
            first_line = (str(exc).splitlines() or [""])[0][:200]
            raise UserError(
                f"{self._label} {self._source!r}: {first_line}; expected every value under 'model' to be a "
                "numpy array or tensor"
            ) from None
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
