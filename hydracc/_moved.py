"""Deprecated module paths from before the stage folders: each old module forwards to its new home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any


def forward(old: str, *new: str, only: Iterable[str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that finds each name in the first of ``new`` that has it.

    Dunder names are never forwarded (a forwarded ``__path__`` would make a module pose as a
    package). ``only`` limits forwarding to the names a module used to have, so that probing a
    package for anything else imports nothing.
    """
    allowed = None if only is None else frozenset(only)

    def __getattr__(name: str) -> Any:
        if name.startswith("__") or (allowed is not None and name not in allowed):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        for target in new:
            module = importlib.import_module(target)
            if hasattr(module, name):
                warnings.warn(f"{old} moved: import {name} from {target}", DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
