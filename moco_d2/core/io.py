"""Checkpoints that survive a crash: atomic writes, rotation, and safe (weights-only) loading."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from moco_d2.core.errors import UserError

logger = logging.getLogger("moco")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingFile:
    """A file object that remembers the OSError a ``write`` raised: ``torch.save`` reports a full disk or
    ``ulimit -f`` as an opaque RuntimeError ("unexpected pos ..."), so the cause is taken from here."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


_ENOSPC_HINT = " (disk full or file size limit: free space, then continue; the previous file is intact)"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], None],
    what: str = "file",
    check: Callable[[Path], None] | None = None,
    suffix: str = ".tmp",
) -> Path:
    """The one atomic writer: ``write`` fills a temp file beside ``path``, it is fsynced, ``check``-ed, given
    the usual permissions (``0o666 & ~umask``; mkstemp creates 0600) and renamed over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn write; a failure
    (or a ``check`` that raises) leaves no temp file behind. OS errors are one-line UserErrors.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        recorder = None
        try:
            with os.fdopen(fd, "wb") as f:
                recorder = _RecordingFile(f)
                write(recorder)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
        except Exception as exc:
            cause = exc if isinstance(exc, OSError) else recorder.error if recorder is not None else None
            if cause is None:
                raise  # not an I/O problem (e.g. an object that cannot be saved): a bug, keep its traceback
            raise UserError(
                f"cannot write {what} {str(path)!r}: {cause.strerror or cause}"
                f"{_ENOSPC_HINT if cause.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ''}"
            ) from None
        if check is not None:
            check(tmp)
        try:
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except OSError as exc:
            raise UserError(f"cannot write {what} {str(path)!r}: {exc.strerror or exc}") from None
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike, **dump_options: Any) -> Path:
    """JSON (indented, newline-terminated), written atomically. ``dump_options`` go to ``json.dumps``
    (e.g. ``allow_nan=False``)."""
    text = json.dumps(obj, indent=2, **dump_options) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()), what="file")


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save``, written atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def publish_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Atomically make ``dst`` (e.g. ``model_best.pth``) a byte copy of the checkpoint ``src``."""
    return atomic_write(dst, lambda f: f.write(Path(src).read_bytes()), what="checkpoint")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; every way a file can be wrong is a UserError.

    Arbitrary Python objects are refused, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "numpy" in text:
            raise UserError(
                f"checkpoint {str(path)!r} holds numpy arrays (an already converted Detectron2 .pkl?); "
                "expected a PyTorch checkpoint"
            ) from None
        if "Unsupported global" in text or "GLOBAL" in text:
            raise UserError(
                f"checkpoint {str(path)!r} holds Python objects other than tensors and plain containers; "
                "refusing to load it (weights_only=True)"
            ) from None
        raise UserError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint (or is corrupt): it cannot be unpickled"
        ) from None
    except Exception as exc:  # torch.load reports torn files as many types (EOF, Key, Index, Runtime...)
        detail = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise UserError(f"checkpoint {str(path)!r} is truncated or corrupt ({what})") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict")
    return obj


_CKPT_RE = re.compile(r"^checkpoint_(\d+)(?:_iter(\d+))?\.pth$")


_TMP_RE = re.compile(r"^\.(?:checkpoint_\d+(?:_iter\d+)?|model_final)\.pth\..+\.tmp$")


class CheckpointManager:
    """Saves ``checkpoint_*.pth`` in ``out_dir``, keeps the last ``keep_last``, finds the newest valid one.

    Rotation never deletes a checkpoint in favour of one that does not load: only checkpoints this
    manager wrote, or that it loaded successfully, count towards ``keep_last``; a torn file newer than
    those is left alone (``latest_valid`` skips it with a warning) and goes once it is old enough.
    """

    def __init__(self, out_dir: str | os.PathLike, keep_last: int = 3) -> None:
        self.out_dir = Path(out_dir)
        self.keep_last = max(1, int(keep_last))
        self._written: set[str] = set()
        self._checked: dict[str, tuple[tuple[int, int], bool]] = {}  # name -> ((size, mtime), loads)

    @staticmethod
    def name_for(epoch: int, step_in_epoch: int | None = None, iteration: int | None = None) -> str:
        """``checkpoint_{epoch:04d}.pth`` at epoch ends, ``..._iter{iteration:07d}.pth`` mid-epoch."""
        if step_in_epoch:
            return f"checkpoint_{epoch:04d}_iter{int(iteration or 0):07d}.pth"
        return f"checkpoint_{epoch:04d}.pth"

    def save(self, state: dict, name: str) -> Path:
        path = save_atomic(state, self.out_dir / name)
        self._written.add(path.name)
        self._checked.pop(path.name, None)
        self._rotate()
        return path

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first (ordered by epoch, then iteration; epoch-end after mid-epoch)."""
        if not self.out_dir.is_dir():
            return []
        found = []
        for p in self.out_dir.iterdir():
            m = _CKPT_RE.match(p.name)
            if m:
                epoch = int(m.group(1))
                it = int(m.group(2)) if m.group(2) is not None else None
                # Both names store the number of completed epochs, so a mid-epoch file of epoch E comes
                # after the epoch-end file of E completed epochs.
                found.append(((epoch, 0 if it is None else 1, it or 0), p))
        return [p for _, p in sorted(found)]

    def _loads(self, path: Path) -> tuple[bool, str]:
        """Whether ``path`` loads (cached per size and mtime); the reason when it does not."""
        if path.name in self._written:
            return True, ""
        try:
            st = path.stat()
        except OSError as exc:
            return False, exc.strerror or str(exc)
        key = (st.st_size, st.st_mtime_ns)
        cached = self._checked.get(path.name)
        if cached is not None and cached[0] == key:
            return cached[1], "does not load"
        try:
            load_checkpoint(path)
            ok, why = True, ""
        except UserError as exc:
            ok, why = False, str(exc)
        self._checked[path.name] = (key, ok)
        return ok, why

    def _rotate(self) -> None:
        kept = 0
        for p in reversed(self.checkpoints()):
            if kept >= self.keep_last:
                p.unlink(missing_ok=True)
            elif self._loads(p)[0]:
                kept += 1
            # else: a file that does not load never counts and is never a reason to delete a good one

    def latest_valid(self) -> Path | None:
        """Newest checkpoint that actually loads; a torn or corrupt newest file falls back to the one before
        (with a warning naming it)."""
        for p in reversed(self.checkpoints()):
            ok, why = self._loads(p)
            if ok:
                return p
            logger.warning("skipping %s: %s; trying the checkpoint before it", p.name, why)
        return None

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temp files (``.checkpoint_*.pth.*.tmp``) a killed run left behind.

        Call it only from the one process that writes ``out_dir``, before it writes anything.
        """
        removed = []
        if not self.out_dir.is_dir():
            return removed
        for p in self.out_dir.iterdir():
            if _TMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
                try:
                    size = p.stat().st_size
                    p.unlink()
                except OSError:
                    continue
                removed.append(p)
                logger.warning("removed %s (%d bytes), a temp file left by an interrupted save", p, size)
        return removed


def choose_resume(resume: str, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run continues from, decided on rank 0 and shared with every rank.

    ``RESUME ''``: a fresh run, refused when ``out_dir`` already holds checkpoints (its rotation would
    delete another run's work); ``RESUME auto``: the newest valid checkpoint in ``out_dir`` (None when
    there is none); anything else: that path. A refusal is raised on every rank alike.
    """
    from moco_d2.core import distributed as dist_utils

    choice: list[str | None] = [None, None]  # [checkpoint path, error message]
    if dist_utils.is_main_process():
        manager = CheckpointManager(out_dir)
        if resume == "auto":
            latest = manager.latest_valid()
            choice[0] = str(latest) if latest else None
        elif resume:
            choice[0] = str(resume)
        elif existing := manager.checkpoints():
            choice[1] = (
                f"OUTPUT_DIR {str(out_dir)!r} already holds a run's checkpoints (newest {existing[-1].name}); "
                "continue it with RESUME auto, or start the new run in another OUTPUT_DIR"
            )
    if dist_utils.is_dist():
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise UserError(choice[1])
    return Path(choice[0]) if choice[0] else None
