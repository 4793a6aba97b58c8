"""The conversion pipeline: options (``ConvertOptions``), the stages, and the one function that runs them.

``from hydracc.pipeline import ConvertOptions, run_conversion, convert`` and the stage functions
(``inspect_checkpoint``, ``calibration_for``, ``analyze_heads``, ``make_plan``, ``learn_params``,
``rewrite``, ``emit``) are all here. Imports are lazy: importing this package (or
``hydracc.pipeline.options``, which the CLI does to build its flags) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_STAGES = ("SIDE_FILES", "CALIBRATION_BATCH", "Inspection", "Rewrite", "ConversionResult", "inspect_checkpoint",
           "calibration_shape", "calibration_for", "analyze_heads", "make_plan", "load_plugins", "rewrite",
           "needs_learned_params", "learn_params", "provenance", "emit")
_HOMES = {
    **{name: "hydracc.pipeline.stages" for name in _STAGES},
    **{name: "hydracc.pipeline.options" for name in ("ConvertOptions", "OptionError", "linear_kind_choices", "flag_of")},
    **{name: "hydracc.pipeline.run" for name in ("run_conversion", "convert", "ProgressHooks", "Interrupted")},
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hydracc.pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
