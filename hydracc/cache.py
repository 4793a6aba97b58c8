"""Deprecated: moved to ``hydracc.runtime.cache``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.runtime.cache")
