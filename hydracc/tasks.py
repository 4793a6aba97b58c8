"""Deprecated: moved to ``hydracc.evaluation.tasks``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.evaluation.tasks")
