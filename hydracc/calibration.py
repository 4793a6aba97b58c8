"""Deprecated: moved to ``hydracc.analysis.calibration``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.analysis.calibration")
