"""Deprecated: moved to ``hydracc.frontend.capture``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.frontend.capture")
