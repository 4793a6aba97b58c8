"""Deprecated: moved to ``hydracc.analysis.scores``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.analysis.scores")
