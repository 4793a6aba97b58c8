"""Deprecated: moved to ``hydracc.passes.weight_edits``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.passes.weight_edits")
