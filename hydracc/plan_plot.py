"""Deprecated: moved to ``hydracc.planning.plot``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.planning.plot")
