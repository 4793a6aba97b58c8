"""``hydracc analyze``: score every head on calibration data (the analysis stage alone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hydracc.cli.common import (
    Reporter,
    json_option,
    linear_kind_type,
    print_calibration,
    quiet_option,
    rich_hooks,
    run_command,
    scores_table,
)
from hydracc.cli.convert import option_params

_CALIBRATION = ("calib", "calib_samples", "seq_len", "sensitivity", "exact_k", "objective", "device")


def _calibration_options(fn: Any) -> Any:
    """The calibration and measurement flags, exactly as ``convert`` declares them (from ``ConvertOptions``)."""
    fn.__click_params__ = [*getattr(fn, "__click_params__", []),
                           *reversed([p for p in option_params() if p.name in _CALIBRATION])]
    return fn


@click.command("analyze")
@click.argument("path", type=click.Path(path_type=Path))
@_calibration_options
@click.option("--linear-kind", type=linear_kind_type(), default="streaming", show_default=True,
              help="Kind the linear_error and sensitivity scores measure (hedgehog and gdn at their starting values, with "
                   "fusion).")
@json_option("Print the scores as JSON on stdout; the table goes to stderr.")
@quiet_option("No progress bar or table.")
def analyze_command(path: Path, calib: Path | None, calib_samples: int, seq_len: int, sensitivity: str, exact_k: int,
                    objective: str, device: str | None, linear_kind: str, as_json: bool, quiet: bool) -> None:
    """Score every attention head of the checkpoint at PATH on calibration data.

    \b
    retrieval    attention on the token after an earlier occurrence of the current token,
                 above what a uniform head gives (copy / induction heads score near 1)
    distance     mean attended distance in tokens (small = local)
    sink         attention mass on the first token
    entropy      attention entropy / log(position + 1) (1 = uniform)
    lin_err      relative output error of the linear kind on the same q, k, v
    sensitivity  KL of the model's next-token distribution when this KV group (GQA) or
                 head alone is made linear, mean over calibration tokens
    recall       change of the cross-entropy at positions whose next token is predictable
                 by copying, when the unit alone is made linear
    (--sensitivity auto re-measures exactly the --exact-k units around a quarter of the units.)
    """
    reporter = Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from hydracc.pipeline import stages
        from hydracc.pipeline.options import check_device

        check_device(device)
        insp = stages.inspect_checkpoint(path, calibration=(calib_samples, seq_len), dtype=stages.capture_dtype(device))
        hooks = rich_hooks(reporter)
        try:
            calibration = stages.calibration_for(insp, calib, samples=calib_samples, seq_len=seq_len)
            hooks.begin("analyze")
            try:
                analysis = stages.analyze_heads(insp, calibration, linear_kind=linear_kind, method=sensitivity, exact_k=exact_k,
                                                objective=objective, device=device, progress=hooks.analyzed)
            finally:
                hooks.end("analyze")
        finally:
            insp.checkpoint.close()
        reporter.console.print(scores_table(analysis, None))
        print_calibration(reporter.console, analysis)
        return {"status": "ok", "input": str(path), **analysis.to_json()}

    run_command(reporter, work)
