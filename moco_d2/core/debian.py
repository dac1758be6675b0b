"""Installing the Debian package some data comes from (the demo's Fashion-MNIST, the tests' photos).

Only as root with apt-get: anyone else gets the exact command instead of a password prompt in the middle
of ``make``. ``python -m moco_d2.core.debian PACKAGE GLOB WHAT`` installs PACKAGE unless GLOB matches a
file, and otherwise says that WHAT will be skipped; it never fails the caller. ``... debian photos`` is
that for the photos below.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Real photographs for the augmentation tests and bench: Debian's lomiri-wallpapers (-16.04 / -20.04), ~30 MB
# of JPEGs. ``make test`` installs them when allowed (``python -m moco_d2.core.debian photos``).
PHOTO_PACKAGE = "lomiri-wallpapers"
PHOTO_DIR = Path("/usr/share/backgrounds")


def photos() -> list[Path]:
    """The installed photos, sorted; [] when the package is absent."""
    return sorted(PHOTO_DIR.glob("*.jpg")) if PHOTO_DIR.is_dir() else []


def can_install() -> bool:
    """Whether this process may run apt-get itself (root, apt-get on the PATH)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def install(package: str, quiet: bool = False) -> bool:
    """``apt-get install -y package``, retried once after ``apt-get update`` (a fresh machine's package
    lists may be stale); True when apt-get succeeded."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = subprocess.DEVNULL if quiet else None

    def run(*args: str) -> bool:
        return subprocess.run(["apt-get", *args], env=env, stdout=out, stderr=out).returncode == 0

    return run("install", "-y", package) or (run("update") and run("install", "-y", package))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["photos"]:
        args = [PHOTO_PACKAGE, str(PHOTO_DIR / "*.jpg"), "the real-photo test cases"]
    package, pattern, what = args
    if glob.glob(pattern):
        return 0
    if not can_install():
        print(f"{pattern}: nothing there, so {what} will be skipped (sudo apt-get install {package})")
    elif install(package, quiet=True) and glob.glob(pattern):
        print(f"installed Debian's {package} for {what}")
    else:
        print(f"could not install {package}: {what} will be skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
