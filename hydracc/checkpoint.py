"""Deprecated: moved to ``hydracc.frontend.checkpoint``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.frontend.checkpoint")
