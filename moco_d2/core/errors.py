"""User-facing errors: a user's mistake is reported in one line, never as a deep traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A problem with the user's input (paths, config keys, data, checkpoints)."""


def exit_on_user_error(fn: F) -> F:
    """Wrap a ``main()`` so a :class:`UserError` prints ``error: <msg>`` and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
