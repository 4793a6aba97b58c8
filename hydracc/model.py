"""Deprecated: moved to ``hydracc.frontend.model``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.frontend.model")
