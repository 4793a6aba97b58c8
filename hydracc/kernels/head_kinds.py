"""Deprecated: the kind table moved to :mod:`hydracc.kernels.kinds` (one module per kind)."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.kernels.kinds")
