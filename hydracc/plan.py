"""Deprecated: moved to ``hydracc.planning.plan``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.planning.plan")
