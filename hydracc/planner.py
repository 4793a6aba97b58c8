"""Deprecated: moved to ``hydracc.planning.budget``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.planning.budget")
