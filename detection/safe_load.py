"""Loading weight files without running code from them.

Detectron2 reads ``.pkl`` weights with plain :mod:`pickle`, which runs whatever a file's
``__reduce__`` asks for. The converter's output is a ``.pkl`` that users pass around, so here a
``.pkl`` is read by an unpickler that can only rebuild numpy arrays, dtypes and scalars and plain
containers (dict, OrderedDict, list, tuple, str, int, float, bool, None); any other global is
refused before it is called. ``.pth``/``.pyth`` files go through ``torch.load(weights_only=True)``,
set explicitly rather than relying on the installed torch's default.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from moco_d2.core.errors import UserError

# (module, name) pairs the unpickler may look up: everything needed to rebuild numpy arrays (each
# numpy version and pickle protocol names them differently) and plain containers; nothing that can
# call into arbitrary code.
_NUMPY_CORE = ("numpy.core", "numpy._core")
SAFE_GLOBALS = frozenset(
    {(f"{core}.multiarray", name) for core in _NUMPY_CORE for name in ("_reconstruct", "scalar")}
    | {(f"{core}.numeric", "_frombuffer") for core in _NUMPY_CORE}
    | {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("builtins", "bool"),
        # protocol 0-2 pickles of numpy buffers in Python 3 spell bytes as _codecs.encode(str, "latin1")
        ("_codecs", "encode"),
    }
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`SAFE_GLOBALS`."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(module, name)


def load_restricted_pickle(path: str) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (latin1 strings, as Detectron2 reads py2 pickles).

    Raises :class:`UnsafePickleError` for any other global; nothing from the file is executed.
    """
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding="latin1").load()


def load_torch_weights(path: str) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True`` (tensors and plain containers only)."""
    return torch.load(path, map_location=torch.device("cpu"), weights_only=True)


def refused_global(exc: BaseException) -> str | None:
    """The global a restricted load refused (ours or torch's weights_only), else None."""
    if isinstance(exc, UnsafePickleError):
        return exc.global_name
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
            if marker in text:
                return text.split(marker, 1)[1].split()[0].rstrip(".,")
        return "a Python object"
    return None


def refuse(label: str, path: str, global_name: str) -> UserError:
    """The one-line error for a weights file that wants to build something other than weights."""
    return UserError(
        f"{label} {path!r} refused: it holds a Python object ({global_name}), not only arrays/tensors and "
        "plain containers; loading it could run code. Use weights written by `python -m convert` "
        "(.pkl) or a Detectron2 .pth checkpoint from a source you trust"
    )


__all__ = [
    "SAFE_GLOBALS",
    "RestrictedUnpickler",
    "UnsafePickleError",
    "load_restricted_pickle",
    "load_torch_weights",
    "refuse",
    "refused_global",
]
