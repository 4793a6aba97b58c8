"""The conversion from Python: ``convert(path, out, **options)`` and the stage functions, by their README names.

Everything lives in ``hydracc.pipeline`` (options in ``pipeline.options``, stages in
``pipeline.stages``, the one conversion in ``pipeline.run``); this module re-exports it so that
``from hydracc.convert import convert, inspect_checkpoint, ...`` keeps working.
"""

from __future__ import annotations

from hydracc.pipeline.options import ConvertOptions, OptionError
from hydracc.pipeline.run import Interrupted, ProgressHooks, convert, run_conversion
from hydracc.pipeline.stages import (
    CALIBRATION_BATCH,
    SIDE_FILES,
    ConversionResult,
    Inspection,
    Rewrite,
    analyze_heads,
    calibration_for,
    calibration_shape,
    emit,
    inspect_checkpoint,
    learn_params,
    load_plugins,
    make_plan,
    needs_learned_params,
    provenance,
    rewrite,
)

__all__ = [
    "CALIBRATION_BATCH", "SIDE_FILES", "ConversionResult", "ConvertOptions", "Inspection", "Interrupted", "OptionError",
    "ProgressHooks", "Rewrite", "analyze_heads", "calibration_for", "calibration_shape", "convert", "emit",
    "inspect_checkpoint", "learn_params", "load_plugins", "make_plan", "needs_learned_params", "provenance", "rewrite",
    "run_conversion",
]

from hydracc._moved import forward as _forward  # noqa: E402

# anything else the old module had at top level (``Budget``, ``DistillSettings``, ...) still resolves, with a warning
__getattr__ = _forward("hydracc.convert", "hydracc.pipeline.stages")
