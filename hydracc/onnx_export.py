"""Deprecated: moved to ``hydracc.export.onnx``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.export.onnx")
