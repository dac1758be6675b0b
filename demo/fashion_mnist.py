"""Read Debian's ``dataset-fashion-mnist`` package (IDX files) into numpy arrays.

The package ships the original gzip'd IDX files; this module only parses them, and, when they are
missing, either installs the package (as root) or says exactly what to run.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from moco_d2.core import debian
from moco_d2.core.errors import UserError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
INSTALL_COMMAND = f"sudo apt-get install -y {DEBIAN_PACKAGE}"

# Fashion-MNIST label order; names are filesystem-safe (used as ImageFolder dirs and VOC names).
CLASS_NAMES = (
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one gzip'd IDX file of unsigned bytes with ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable gzip'd IDX file ({e})") from e
    if len(data) < 4 + 4 * ndim or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise UserError(f"{path}: expected an IDX file of unsigned bytes with {ndim} dimensions")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise UserError(f"{path}: header says {dims} but the file holds {len(data) - offset} values")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def ensure_installed(source_dir: Path = DEFAULT_DIR) -> Path:
    """Return ``source_dir`` holding all four files; install the Debian package if allowed.

    Only the default location is installable (apt-get puts the files there). Without root the
    user gets the exact command instead of a password prompt in the middle of ``make``.
    """
    source_dir = Path(source_dir)
    wanted = [source_dir / name for pair in SPLIT_FILES.values() for name in pair]
    missing = [p for p in wanted if not p.is_file()]
    if not missing:
        return source_dir
    if source_dir != DEFAULT_DIR:
        raise UserError(f"{missing[0]}: missing (expected the Fashion-MNIST IDX files in {source_dir})")
    if not debian.can_install():
        raise UserError(f"{missing[0]} not found: install Fashion-MNIST with `{INSTALL_COMMAND}`")
    print(f"Fashion-MNIST not found; installing the Debian package {DEBIAN_PACKAGE} ...", flush=True)
    ok = debian.install(DEBIAN_PACKAGE)
    missing = [p for p in wanted if not p.is_file()]
    if not ok or missing:
        raise UserError(f"could not install {DEBIAN_PACKAGE}; run `{INSTALL_COMMAND}` and retry")
    return source_dir


def load_split(split: str, source_dir: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 28, 28) uint8`` and labels ``(N,) int64`` of ``split`` ("train" or "test")."""
    if split not in SPLIT_FILES:
        raise UserError(f"Fashion-MNIST split {split!r}: expected one of {sorted(SPLIT_FILES)}")
    source_dir = ensure_installed(Path(source_dir))
    image_file, label_file = SPLIT_FILES[split]
    images = _read_idx(source_dir / image_file, 3)
    labels = _read_idx(source_dir / label_file, 1).astype(np.int64)
    if len(images) != len(labels):
        raise UserError(f"{source_dir}: {len(images)} {split} images but {len(labels)} labels")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise UserError(f"{source_dir / label_file}: label {labels.max()} outside 0..{len(CLASS_NAMES) - 1}")
    return images, labels
