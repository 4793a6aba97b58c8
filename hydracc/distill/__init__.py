"""Distill stage: values for the parameters a conversion adds (measured initial values, then optional
training); see ``train``."""

from hydracc.distill.train import (
    DistillResult,
    DistillSettings,
    distill,
    initial_values,
    state_dir_for,
)

__all__ = ["DistillResult", "DistillSettings", "distill", "initial_values", "state_dir_for"]
