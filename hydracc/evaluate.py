"""Deprecated: moved to ``hydracc.evaluation.evaluate``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.evaluation.evaluate")
