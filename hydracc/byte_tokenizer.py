"""Deprecated: moved to ``hydracc.evaluation.byte_tokenizer``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.evaluation.byte_tokenizer")
