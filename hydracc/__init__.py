"""hydracc: turn a pretrained transformer into a head-level hybrid of full and linear attention."""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"


def load(path: str | os.PathLike[str], *, dtype: Any = None, device: Any = "cpu") -> Any:
    """Load a converted checkpoint and return a transformers model running the hybrid.

    See :func:`hydracc.runtime.load`; imported lazily so ``import hydracc`` stays cheap.
    """
    from hydracc.runtime import load as _load

    return _load(path, dtype=dtype, device=device)
