"""Distill stage: values for the parameters a conversion adds (measured initial values, then optional
training); see ``train``."""

from hydracc._moved import forward
from hydracc.distill.train import (
    DistillResult,
    DistillSettings,
    distill,
    initial_values,
    state_dir_for,
)

__all__ = ["DistillResult", "DistillSettings", "distill", "initial_values", "state_dir_for"]

# names of the old ``hydracc/distill.py`` module, before the stage folders
__getattr__ = forward(__name__, "hydracc.distill.records", "hydracc.distill.state", "hydracc.distill.train", only=(
    "DistillError", "SiteRecord", "record_sites", "param_name", "initial_params", "layer_initial_params",
    "transfer_loss"))
