"""hydracc: turn a pretrained transformer into a head-level hybrid of full and linear attention.

``import hydracc`` stays cheap: it does not import torch or transformers. It arranges that
hydracc's attention function (``"hydracc"``) and the hybrid cache are registered with
transformers as soon as transformers is imported (or at once if it already is), so that
``AutoModelForCausalLM.from_pretrained(converted)`` builds the hybrid model; a converted
checkpoint's ``config.json`` names ``"attn_implementation": "hydracc"``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from typing import Any

__version__ = "0.1.0"


def _register_runtime() -> None:
    try:
        importlib.import_module("hydracc.runtime.loader")
    except Exception as exc:  # never break the user's import of transformers
        warnings.warn(f"hydracc could not register its attention function with transformers: {exc}", stacklevel=2)


class _RegisterAfterImport(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, finder: _WatchForTransformers) -> None:
        self.inner = inner
        self.finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        self.inner.exec_module(module)  # type: ignore[attr-defined]
        _register_runtime()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.inner, name)


class _WatchForTransformers(importlib.abc.MetaPathFinder):
    """Registers hydracc with transformers right after transformers is first imported.

    Stays installed until transformers is actually executed (a mere ``find_spec`` check for
    whether transformers is installed does not use it up).
    """

    def __init__(self) -> None:
        self._busy = False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "transformers" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader, self)
        return spec


if "transformers" in sys.modules:
    _register_runtime()
elif not any(isinstance(f, _WatchForTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _WatchForTransformers())


def load(path: str | os.PathLike[str], *, dtype: Any = None, device: Any = "cpu", allow_nonfinite: bool = False,
         check_hashes: bool = True) -> Any:
    """Load a converted checkpoint and return a transformers model running the hybrid.

    See :func:`hydracc.runtime.loader.load`; imported lazily so ``import hydracc`` stays cheap.
    """
    from hydracc.runtime.loader import load as _load

    return _load(path, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite, check_hashes=check_hashes)


def __getattr__(name: str) -> Any:
    if name == "HybridCache":  # lazily, so that `import hydracc` does not import torch
        from hydracc.runtime.cache import HybridCache

        return HybridCache
    raise AttributeError(f"module 'hydracc' has no attribute {name!r}")
