"""Deprecated: moved to ``hydracc.runtime.hydra_config`` and ``hydracc.emit.hydra_section``."""

from hydracc._moved import forward

__getattr__ = forward(__name__, "hydracc.runtime.hydra_config", "hydracc.emit.hydra_section")
