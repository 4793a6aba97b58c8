"""``hydracc export-onnx``: prefill and decode graphs of a converted checkpoint, checked with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hydracc.cli.common import (
    Reporter,
    allow_nonfinite_option,
    check_hashes_option,
    json_option,
    rich_hooks,
    run_command,
)
from hydracc.cli.convert import print_onnx


@click.command("export-onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder for the ONNX files (default: CHECKPOINT/onnx).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Weights and activations of the graphs (linear heads' states stay float32).")
@click.option("--atol", type=click.FloatRange(0.0), default=None,
              help="Largest |onnxruntime - torch| accepted; above it the export fails (exit 2). Default: 1e-4 for "
                   "float32; for float16 2e-2, relative to each output's largest magnitude.")
@click.option("--check-tokens", type=click.IntRange(1), default=8, show_default=True, help="Tokens to decode through the decode graph in the check.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists (only one hydracc wrote).")
@allow_nonfinite_option()
@check_hashes_option()
@json_option("Print a JSON report on stdout.")
def export_onnx_command(
    checkpoint: Path, output: Path | None, dtype: str, atol: float | None, check_tokens: int, force: bool, allow_nonfinite: bool,
    check_hashes: bool, as_json: bool,
) -> None:
    """Export the converted CHECKPOINT to ONNX: a prefill graph and a decode-step graph.

    \b
    prefill.onnx  input_ids, position_ids [batch, seq] -> logits, present.L.* (the hybrid cache)
    decode.onnx   input_ids, position_ids [batch, 1], past.L.* -> logits, present.L.*

    Per layer the cache is keys/values for the KV heads full heads use, the linear heads'
    state/norm, and the streaming heads' ring of window rows with their positions. Every
    head kind exports (gdn's prefill as an ONNX Scan). Batch and lengths are dynamic;
    weights and activations are --dtype. Both graphs are checked with onnxruntime against
    hydracc on fresh random inputs (decoding --check-tokens tokens); a difference above
    --atol fails the command and leaves nothing at the output path.
    """
    reporter = Reporter(as_json, False)

    def work() -> dict[str, Any]:
        from hydracc.pipeline.options import require_onnx

        require_onnx()
        from hydracc.export.onnx import export_onnx

        hooks = rich_hooks(reporter)
        hooks.begin("onnx")
        try:
            report = export_onnx(checkpoint, output, atol=atol, check_tokens=check_tokens, force=force, dtype=dtype,
                                 allow_nonfinite=allow_nonfinite, check_hashes=check_hashes)
        finally:
            hooks.end("onnx")
        print_onnx(reporter, report)
        return {"status": "ok", **report.to_json()}

    run_command(reporter, work)
