"""The ``hydracc`` command line.

Design decisions:
- Thin: every command calls the pipeline functions in ``hydracc.convert``; nothing here
  computes anything a Python user could not get.
- Exit codes: 0 success; 2 bad input (unreadable checkpoint, unsupported architecture,
  invalid plan, output exists, bad option); 1 an internal error (a bug: please report);
  130 interrupted. Errors are one clear message on stderr, never a traceback
  (``HYDRACC_DEBUG=1`` shows it).
- ``--json`` prints one JSON document on stdout (the report or the error) and sends the
  human-readable tables and progress to stderr, so scripts can parse stdout as is.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

import hydracc
from hydracc.errors import EXIT_INTERNAL, HydraError

EXIT_INTERRUPTED = 130


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


_KIND_CHARS = {"full": "F", "elu": "e", "hedgehog": "h", "gdn": "g", "streaming": "s"}


def _kinds_cell(kinds: list[str]) -> str:
    """One character per head (``_KIND_CHARS``; the first letter for a kind added later)."""
    return " ".join(_KIND_CHARS.get(k, k[0]) for k in kinds)


def _sites_table(inspection: Any) -> Table:
    table = Table(title="Attention sites found in the captured graph", title_justify="left")
    for col in ("layer", "module", "attention", "q heads", "kv heads", "group", "head dim", "scale", "mask"):
        table.add_column(col, justify="right" if col not in ("module", "attention", "mask") else "left")
    for s in inspection.captured.sites:
        table.add_row(
            str(s.layer), s.module, s.attention_kind, str(s.num_heads), str(s.num_kv_heads),
            str(s.group_size), str(s.head_dim), f"{s.scale:.4g}", "causal" if s.causal else "?",
        )
    return table


def _plan_table(plan: Any) -> Table:
    table = Table(title="Plan: head kinds per layer (F full softmax, e elu, h hedgehog, g gdn, s streaming)", title_justify="left")
    for col in ("layer", "module", "heads", "full", "converted", "KV heads cached"):
        table.add_column(col, justify="left" if col in ("module", "heads") else "right")
    for lp in plan.layers:
        full = len(lp.full_heads())
        table.add_row(
            str(lp.layer), lp.module, _kinds_cell(lp.kinds), str(full), str(lp.num_heads - full),
            f"{len(lp.cached_kv_heads())}/{lp.num_kv_heads}",
        )
    return table


def _report(result: Any, *, dry_run: bool) -> dict[str, Any]:
    insp = result.inspection
    cost = result.cost
    report: dict[str, Any] = {
        "status": "ok",
        "hydracc_version": hydracc.__version__,
        "mode": "plan" if dry_run else "convert",
        "input": str(insp.checkpoint.root),
        "model_type": insp.captured.config.model_type,
        "dropped_tensors": insp.dropped,
        "sites": [
            {
                "layer": s.layer, "module": s.module, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
                "head_dim": s.head_dim, "scale": s.scale, "causal": s.causal, "permutable": s.permutable,
            }
            for s in insp.captured.sites
        ],
        "plan": result.plan.to_json(),
        "analysis": result.analysis.to_json() if result.analysis is not None else None,
        "kv_cache": {
            "element_bytes": insp.element_bytes,
            "bytes_per_token_before": cost.kv_bytes_per_token_before,
            "bytes_per_token_after": cost.kv_bytes_per_token_after,
            "ratio": round(cost.ratio, 6),
            "linear_state_bytes_per_sequence": cost.linear_state_bytes,
        },
    }
    if result.rewrite is not None:
        report["passes"] = result.rewrite.passes
        report["notes"] = result.rewrite.context.notes
    if getattr(result, "learned", None) is not None:
        report["distill"] = result.learned.record()
    if result.output is not None:
        report["output"] = {"path": str(result.output), "files": [p.name for p in result.files]}
    return report


class _Reporter:
    def __init__(self, as_json: bool, quiet: bool) -> None:
        self.as_json = as_json
        stream = sys.stderr if as_json else sys.stdout
        width = None if stream.isatty() else 120  # rich's 80-column default would cut module paths
        self.console = Console(stderr=as_json, quiet=quiet, highlight=False, width=width)
        self.err = Console(stderr=True, highlight=False)

    def fail(self, message: str, code: int) -> None:
        if self.as_json:
            click.echo(json.dumps({"status": "error", "exit_code": code, "error": message}))
        self.err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(code)


def _run_guarded(reporter: _Reporter, fn: Any) -> Any:
    try:
        return fn()
    except HydraError as exc:
        reporter.fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        reporter.fail("interrupted; nothing was written to the output path", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug, not the user's fault
        if os.environ.get("HYDRACC_DEBUG") == "1":
            traceback.print_exc()
        reporter.fail(
            f"internal error: {type(exc).__name__}: {exc} (set HYDRACC_DEBUG=1 for the traceback, and please report it)",
            EXIT_INTERNAL,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(hydracc.__version__, prog_name="hydracc")
def main() -> None:
    """hydracc turns a pretrained transformer into a head-level hybrid: some attention heads keep
    full softmax attention, the others become linear attention with a fixed-size state.

    \b
    Typical use:
      hydracc convert model/ --plan                 # dry run: what would change, KV cache before/after
      hydracc convert model/ -o out/                # convert; out/ is a normal safetensors checkpoint
      hydracc convert model/ -o out/ --plan-file p.json --json   # in CI: a given plan, JSON report

    Exit codes: 0 ok, 2 bad input (nothing written), 1 internal error, 130 interrupted.
    """


def _calibration_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--calib", type=click.Path(path_type=Path), help="Calibration data: plain text, JSON lines with a \"text\" field, or token ids in .npy. Default: built in (suits the example model; synthetic for other vocabularies)."),
        click.option("--calib-samples", type=click.IntRange(1), default=16, show_default=True, help="Calibration sequences."),
        click.option("--seq-len", type=click.IntRange(2), default=256, show_default=True, help="Tokens per calibration sequence."),
    ]):
        fn = option(fn)
    return fn


def _planning_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--strategy", type=click.Choice(["heads", "layers", "random", "even"]), default="heads", show_default=True,
                     help="heads: keep the highest-scoring KV groups/heads full (runs the analysis); layers: whole layers "
                          "(layer-wise hybrid baseline); random: seeded control; even: spread evenly, no analysis."),
        click.option("--full-ratio", type=click.FloatRange(0.0, 1.0), default=None, help="Budget: fraction of units (KV groups under GQA/MQA, else heads) kept full. Default 0.25."),
        click.option("--kv-budget", type=click.FloatRange(0.0, 1.0), default=None, help="Budget: fraction of the original KV-cache bytes to keep (instead of --full-ratio)."),
        click.option("--score", type=click.Choice(["sensitivity", "retrieval", "linear_error"]), default="sensitivity", show_default=True,
                     help="Score that ranks units for --strategy heads (sensitivity = output KL when the unit is made linear)."),
        click.option("--min-full-per-layer", type=click.IntRange(0), default=0, show_default=True, help="Keep at least this many units full in every layer."),
        click.option("--max-full-per-layer", type=click.IntRange(0), default=None, help="Keep at most this many units full in any layer."),
        click.option("--keep-full", multiple=True, metavar="L.H[,L.H]", help="Keep these query heads full (layer.head; under GQA their whole KV group). Repeatable."),
        click.option("--force-linear", multiple=True, metavar="L.H[,L.H]", help="Make these query heads linear (under GQA their whole KV group). Repeatable."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for --strategy random, the hedgehog initialisation and --distill's minibatches."),
        click.option("--linear-kind", type=click.Choice(["elu", "hedgehog", "gdn", "streaming"]), default="elu", show_default=True,
                     help="What converted heads become: elu (parameter-free linear attention), hedgehog (learned feature map), "
                          "gdn (gated delta rule), streaming (attention sink + sliding window, DuoAttention). hedgehog and "
                          "gdn get learned parameters: use --distill."),
        click.option("--sink", type=click.IntRange(0), default=None, help="Streaming heads: first tokens always attended (default 4)."),
        click.option("--window", type=click.IntRange(1), default=None, help="Streaming heads: most recent tokens attended (default 64)."),
        click.option("--fusion/--no-fusion", default=None,
                     help="Scale-normalized fusion: normalize each linear head's output and scale it to the original head's "
                          "size (learned by --distill). Default: on with --distill or a learned kind."),
    ]):
        fn = option(fn)
    return fn


def _distill_options(fn: Any) -> Any:
    for option in reversed([
        click.option("--distill", is_flag=True, help="Train what conversion added (fusion scales, feature maps, gates) to match "
                      "the original heads on calibration data (stage 1, layer by layer), then optionally end to end (stage 2)."),
        click.option("--steps", type=click.IntRange(0), default=200, show_default=True, help="--distill: attention-transfer steps per layer."),
        click.option("--e2e-steps", type=click.IntRange(0), default=0, show_default=True, help="--distill: end-to-end KL steps (0: skip stage 2)."),
        click.option("--lr", type=click.FloatRange(0.0, min_open=True), default=1e-2, show_default=True, help="--distill: stage 1 learning rate (Adam)."),
        click.option("--e2e-lr", type=click.FloatRange(0.0, min_open=True), default=1e-3, show_default=True, help="--distill: stage 2 learning rate."),
        click.option("--distill-samples", type=click.IntRange(1), default=64, show_default=True, help="--distill: calibration sequences to train on."),
        click.option("--distill-batch", type=click.IntRange(1), default=8, show_default=True, help="--distill: sequences per stage 1 step."),
        click.option("--save-every", type=click.IntRange(1), default=50, show_default=True, help="--distill: steps between saved training states (OUTPUT.hydracc-distill/)."),
        click.option("--resume", is_flag=True, help="--distill: continue an interrupted run from its saved state (same inputs and options)."),
        click.option("--device", default=None, help="--distill: train on this torch device (default: cuda when available, else cpu)."),
    ]):
        fn = option(fn)
    return fn


def _check_device(settings: Any) -> None:
    """Refuse a --device that does not exist here, before any work."""
    import torch

    try:
        device = settings.torch_device()
    except (RuntimeError, ValueError) as exc:
        raise HydraError(f"--device {settings.device!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HydraError(f"--device {settings.device}: this machine has no CUDA device", hint="drop --device to train on the CPU")


def _check_onnx_kinds(kinds: list[str]) -> None:
    """Refuse --onnx up front for head kinds the ONNX export does not support."""
    from hydracc.export.onnx import EXPORTABLE_KINDS

    unsupported = sorted(set(kinds) - EXPORTABLE_KINDS)
    if unsupported:
        raise HydraError(f"--onnx: the ONNX export does not support {', '.join(unsupported)} heads yet",
                         hint=f"it exports {', '.join(sorted(EXPORTABLE_KINDS))} heads; convert without --onnx")


def _kind_params(sink: int | None, window: int | None, linear_kind: str) -> dict[str, int] | None:
    if (sink is not None or window is not None) and linear_kind != "streaming":
        raise HydraError("--sink and --window set streaming heads: add --linear-kind streaming")
    params = {k: v for k, v in (("sink", sink), ("window", window)) if v is not None}
    return params or None


def _budget(full_ratio: float | None, kv_budget: float | None, min_full: int, max_full: int | None) -> Any:
    from hydracc.planning.budget import Budget

    if full_ratio is not None and kv_budget is not None:
        raise HydraError("give one budget: --full-ratio or --kv-budget, not both")
    return Budget(full_ratio=0.25 if full_ratio is None and kv_budget is None else full_ratio, kv_budget=kv_budget,
                  min_per_layer=min_full, max_per_layer=max_full)


def _analysis_with_progress(reporter: _Reporter, pipeline: Any, insp: Any, calib: Path | None, samples: int, seq_len: int, linear_kind: str,
                            kind_params: dict[str, int] | None = None) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    calibration = pipeline.calibration_for(insp, calib, samples=samples, seq_len=seq_len)
    with Progress(TextColumn("analyzing heads"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True, disable=reporter.console.quiet) as progress:
        bar = progress.add_task("analyze", total=None)
        return pipeline.analyze_heads(insp, calibration, linear_kind=linear_kind, kind_params=kind_params,
                                      progress=lambda done, total: progress.update(bar, completed=done, total=total))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--plan", "dry_run", is_flag=True, help="Dry run: analyze, print the plan with its scores and the KV-cache change; write nothing (except --plan-out/--plan-png).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder to write the converted checkpoint to (atomically).")
@click.option("--plan-file", type=click.Path(path_type=Path), help="Convert by this plan JSON instead of planning.")
@click.option("--plan-out", type=click.Path(path_type=Path), help="Write the plan JSON (with the scores) to this file.")
@click.option("--plan-png", type=click.Path(path_type=Path), help="Draw a layers x heads heat map of the deciding score, full heads marked (needs matplotlib).")
@_planning_options
@_calibration_options
@_distill_options
@click.option("--pass", "user_passes", multiple=True, metavar="NAME", help="Run a registered pass (after hybridize, before permute-heads). Repeatable.")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE", help="Load a Python file or module that registers passes. Repeatable.")
@click.option("--permute/--no-permute", default=True, show_default=True, help="Reorder heads in the weights so full heads are contiguous.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB or 500MiB.")
@click.option("--onnx", "onnx", is_flag=True, help="Also export OUTPUT/onnx (prefill and decode graphs), checked with onnxruntime (see export-onnx).")
@click.option("--atol", type=click.FloatRange(0.0), default=1e-4, show_default=True, help="With --onnx: largest |onnxruntime - torch| accepted.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (or error) on stdout; tables go to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (and the --json report).")
def convert(
    path: Path,
    dry_run: bool,
    output: Path | None,
    plan_file: Path | None,
    plan_out: Path | None,
    plan_png: Path | None,
    strategy: str,
    full_ratio: float | None,
    kv_budget: float | None,
    score: str,
    min_full_per_layer: int,
    max_full_per_layer: int | None,
    keep_full: tuple[str, ...],
    force_linear: tuple[str, ...],
    seed: int,
    linear_kind: str,
    sink: int | None,
    window: int | None,
    fusion: bool | None,
    calib: Path | None,
    calib_samples: int,
    seq_len: int,
    distill: bool,
    steps: int,
    e2e_steps: int,
    lr: float,
    e2e_lr: float,
    distill_samples: int,
    distill_batch: int,
    save_every: int,
    resume: bool,
    device: str | None,
    user_passes: tuple[str, ...],
    plugins: tuple[str, ...],
    permute: bool,
    force: bool,
    max_shard_size: str,
    onnx: bool,
    atol: float,
    as_json: bool,
    quiet: bool,
) -> None:
    """Convert the checkpoint at PATH (a .safetensors file with config.json beside it, or a folder,
    sharded or not) into a hybrid-attention checkpoint.

    \b
    Planning: with --strategy heads (the default) every head is scored on calibration data
    (see `hydracc analyze`) and the highest-scoring units stay full within the budget
    (--full-ratio, default 0.25, or --kv-budget). Under GQA the unit is the KV group.
    With --onnx the converted checkpoint is written first; if the ONNX check then fails the
    command exits 2 and OUTPUT holds the checkpoint without an onnx folder.

    \b
    Distillation (--distill) trains only the parameters conversion added, on
    --distill-samples calibration rows; it saves its state to OUTPUT.hydracc-distill/ every
    --save-every steps, and --resume continues an interrupted run. The same seed and inputs
    give the same weights.
    """
    reporter = _Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from hydracc import convert as pipeline
        from hydracc.emit.writer import parse_size
        from hydracc.errors import OutputError
        from hydracc.planning.plan import cache_cost

        if not dry_run and output is None:
            raise HydraError("nothing to do: give -o OUTPUT to convert, or --plan for a dry run")
        if dry_run and output is not None:
            raise HydraError("--plan is a dry run and writes no checkpoint: drop -o, or drop --plan to convert")
        try:
            max_bytes = parse_size(max_shard_size)
        except (TypeError, ValueError) as exc:
            raise HydraError(f"--max-shard-size: {exc}") from exc
        if output is not None and not dry_run and output.exists() and not force:
            raise OutputError(f"output {output} already exists", hint="choose a new path or add --force to replace it")
        budget = _budget(full_ratio, kv_budget, min_full_per_layer, max_full_per_layer) if plan_file is None else None
        if plan_png is not None:
            _require_matplotlib()
        if onnx and dry_run:
            raise HydraError("--onnx exports a converted checkpoint: drop --plan and give -o OUTPUT")
        if onnx:
            _require_onnx()  # before any work, not after the checkpoint is written
        from hydracc.passes import get_pass

        pipeline.load_plugins(plugins)
        for name in user_passes:
            get_pass(name)  # an unknown name fails now, before any work
        kind_params = _kind_params(sink, window, linear_kind)
        if resume and not distill:
            raise HydraError("--resume continues a distillation: add --distill")
        if distill and fusion is False:
            raise HydraError("--distill trains the fusion scales: drop --no-fusion")
        if distill and dry_run:
            raise HydraError("--distill trains a converted model: drop --plan and give -o OUTPUT")
        from hydracc.kernels.head_kinds import kind_by_name
        from hydracc.planning.plan import load_plan

        file_plan = load_plan(plan_file) if plan_file is not None else None
        if fusion is False and (kind_by_name(linear_kind).learned and file_plan is None):
            raise HydraError(f"--no-fusion: {linear_kind} heads always come with fusion (their parameters include the scales)",
                             hint="drop --no-fusion, or use --linear-kind elu or streaming")
        if distill and file_plan is None and linear_kind == "streaming" and not fusion:
            raise HydraError("--distill: streaming heads have nothing to train", hint="drop --distill, or add --fusion")
        if onnx:
            _check_onnx_kinds([linear_kind] if file_plan is None else [h.kind for lp in file_plan.layers for h in lp.heads])
        settings = None
        if distill:
            from hydracc.distill.train import DistillSettings

            settings = DistillSettings(steps=steps, e2e_steps=e2e_steps, lr=lr, e2e_lr=e2e_lr, batch=distill_batch, seed=seed,
                                       save_every=save_every, device=device)
            _check_device(settings)
        want_fusion = True if distill else fusion
        needs_analysis = plan_file is None and strategy == "heads"
        may_learn = bool(want_fusion) or kind_by_name(linear_kind).learned or (
            file_plan is not None and pipeline.needs_learned_params(file_plan))
        samples = max(calib_samples, distill_samples if distill else 0)
        shape = pipeline.calibration_shape(samples, seq_len) if needs_analysis or may_learn else (2, 16)
        insp = pipeline.inspect_checkpoint(path, capture_shape=shape)
        try:
            analysis = _analysis_with_progress(reporter, pipeline, insp, calib, calib_samples, seq_len, linear_kind, kind_params) if needs_analysis else None
            plan = pipeline.make_plan(insp, plan_file=plan_file, budget=budget, strategy=strategy, analysis=analysis, score=score,
                                      keep_full=keep_full, force_linear=force_linear, linear_kind=linear_kind, seed=seed,
                                      kind_params=kind_params, fusion=want_fusion)
            if fusion is False and any(lp.has_learned_kind() for lp in plan.layers):
                raise HydraError("--no-fusion: the plan has hedgehog or gdn heads, which always come with fusion")
            cost = cache_cost(plan, insp.captured.sites, insp.element_bytes)
            result = pipeline.ConversionResult(insp, plan, cost, analysis=analysis)
            if plan_out is not None:
                _write_text_atomic(plan_out, plan.dumps())
            if plan_png is not None:
                from hydracc.planning.plot import draw_plan

                draw_plan(plan, plan_png, score=score if strategy == "heads" else "sensitivity")
            if not dry_run:
                assert output is not None
                if pipeline.needs_learned_params(plan) or settings is not None:
                    rows = pipeline.calibration_for(insp, calib, samples=distill_samples if distill else calib_samples, seq_len=seq_len)
                    try:
                        result.learned = _learn_with_progress(reporter, pipeline, insp, plan, rows, settings, output, resume)
                    except KeyboardInterrupt:
                        from hydracc.distill.train import state_dir_for

                        state = state_dir_for(output)
                        saved = f"; the training state is saved in {state}: rerun with --resume to continue" if state.is_dir() else ""
                        reporter.fail(f"interrupted; nothing was written to {output}{saved}", EXIT_INTERRUPTED)
                result.rewrite = pipeline.rewrite(insp, plan, user_passes=user_passes, permute=permute)
                result.files = _emit_with_progress(reporter, pipeline, insp, result.rewrite, output, force, max_bytes, result.learned)
                result.output = output
                if settings is not None:
                    import shutil

                    from hydracc.distill.train import state_dir_for

                    shutil.rmtree(state_dir_for(output), ignore_errors=True)
        finally:
            insp.checkpoint.close()
        _print_human(reporter, result, dry_run, plan_out, plan_png)
        report = _report(result, dry_run=dry_run)
        if onnx:
            assert output is not None
            report["onnx"] = _export_with_check(reporter, output, None, atol, 8, False).to_json()
        return report

    report = _run_guarded(reporter, work)
    if as_json:
        click.echo(json.dumps(report, indent=2))


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@_calibration_options
@click.option("--linear-kind", type=click.Choice(["elu", "hedgehog", "gdn", "streaming"]), default="elu", show_default=True,
              help="Kind the linear_error and sensitivity scores measure (hedgehog and gdn, untrained here, are scored as elu).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON on stdout; the table goes to stderr.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
def analyze(path: Path, calib: Path | None, calib_samples: int, seq_len: int, linear_kind: str, as_json: bool, quiet: bool) -> None:
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
    """
    reporter = _Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from hydracc import convert as pipeline

        insp = pipeline.inspect_checkpoint(path, capture_shape=pipeline.calibration_shape(calib_samples, seq_len))
        try:
            analysis = _analysis_with_progress(reporter, pipeline, insp, calib, calib_samples, seq_len, linear_kind)
        finally:
            insp.checkpoint.close()
        reporter.console.print(_scores_table(analysis, None))
        reporter.console.print(f"calibration: {analysis.calibration['source']} "
                               f"({analysis.calibration['samples']} x {analysis.calibration['seq_len']} tokens)")
        return {"status": "ok", "input": str(path), **analysis.to_json()}

    report = _run_guarded(reporter, work)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise HydraError("--plan-png needs matplotlib", hint="pip install 'hydracc[plot]'") from exc


def _scores_table(analysis: Any, plan: Any | None) -> Table:
    title = "Head scores" + (" and decisions" if plan is not None else "") + f" (unit: {analysis.unit.replace('_', ' ')})"
    table = Table(title=title, title_justify="left")
    cols = ["layer", "head", "unit", "retrieval", "distance", "sink", "entropy", "lin_err", "sensitivity"]
    if plan is not None:
        cols.append("kind")
    for col in cols:
        table.add_column(col, justify="left" if col == "kind" else "right")
    for ls in analysis.layers:
        group = ls.num_heads // ls.num_kv_heads if ls.grouped else 1
        kinds = plan.layer(ls.layer).kinds if plan is not None else None
        for h, sc in enumerate(ls.heads):
            row = [str(ls.layer), str(h), f"g{h // group}" if ls.grouped else "-", f"{sc.retrieval:.3f}", f"{sc.distance:.1f}",
                   f"{sc.sink:.3f}", f"{sc.entropy:.3f}", f"{sc.linear_error:.3f}", f"{sc.sensitivity:.2e}"]
            if kinds is not None:
                row.append("[bold]FULL[/]" if kinds[h] == "full" else kinds[h])
            table.add_row(*row, end_section=h == ls.num_heads - 1)
    return table


def _write_text_atomic(path: Path, text: str) -> None:
    from hydracc.errors import OutputError

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _learn_with_progress(reporter: _Reporter, pipeline: Any, insp: Any, plan: Any, rows: Any, settings: Any, output: Path,
                         resume: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    label = "distilling" if settings is not None else "initialising added parameters"
    with Progress(TextColumn(label + " {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                  disable=reporter.console.quiet) as progress:
        tasks: dict[str, Any] = {}

        def report(stage: str, step: int, steps: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=steps, loss="-")
            progress.update(tasks[stage], completed=step, loss=f"{loss:.4f}")

        return pipeline.learn_params(insp, plan, rows, settings=settings, out=output, resume=resume, progress=report)


def _emit_with_progress(reporter: _Reporter, pipeline: Any, insp: Any, rewrite: Any, output: Path, force: bool, max_bytes: int,
                        learned: Any = None) -> list[Path]:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(insp.checkpoint.info(name).nbytes for name in insp.weight_names.values())
    with Progress(
        TextColumn("writing"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True, disable=reporter.console.quiet,
    ) as progress:
        task = progress.add_task("write", total=total)
        return pipeline.emit(
            insp, rewrite, output, force=force, max_shard_bytes=max_bytes,
            on_tensor=lambda _name, nbytes: progress.advance(task, nbytes), learned=learned,
        )


def _print_human(reporter: _Reporter, result: Any, dry_run: bool, plan_out: Path | None, plan_png: Path | None = None) -> None:
    con = reporter.console
    insp, cost = result.inspection, result.cost
    con.print(f"[bold]{insp.captured.config.model_type}[/] model at {insp.checkpoint.root}: "
              f"{len(insp.captured.sites)} attention sites, weights {', '.join(sorted(str(d).removeprefix('torch.') for d in insp.checkpoint.dtypes()))}")
    if insp.dropped:
        con.print(f"dropping {len(insp.dropped)} tensor(s) transformers ignores on load: {', '.join(insp.dropped[:4])}"
                  + (" ..." if len(insp.dropped) > 4 else ""))
    con.print(_sites_table(insp))
    if result.analysis is not None:
        con.print(_scores_table(result.analysis, result.plan))
        cal = result.analysis.calibration
        con.print(f"calibration: {cal['source']} ({cal['samples']} x {cal['seq_len']} tokens)")
    con.print(_plan_table(result.plan))
    b = result.plan.budget
    if "full_units" in b:
        how = b["strategy"] + (f" by {b['score']}" if "score" in b else "") + (f" (seed {b['seed']})" if "seed" in b else "")
        asked = f"--full-ratio {b['full_ratio']}" if b.get("full_ratio") is not None else f"--kv-budget {b.get('kv_budget')}"
        con.print(f"budget ({asked}): {b['full_units']} of {b['total_units']} {result.plan.unit.replace('_', ' ')}s full, "
                  f"{b['kv_fraction_used']:.1%} of the KV cache; strategy {how}")
    con.print(
        f"KV cache per token: {_human_bytes(cost.kv_bytes_per_token_before)} before -> "
        f"{_human_bytes(cost.kv_bytes_per_token_after)} after ({cost.ratio:.1%}); "
        f"converted heads add a fixed {_human_bytes(cost.linear_state_bytes)} per sequence (linear states, streaming windows)"
    )
    if plan_out is not None:
        con.print(f"plan written to {plan_out}")
    if plan_png is not None:
        con.print(f"plan picture written to {plan_png}")
    if result.rewrite is not None:
        con.print(f"passes: {', '.join(result.rewrite.passes)}")
        for note in result.rewrite.context.notes:
            con.print(f"  {note}")
    learned = getattr(result, "learned", None)
    if learned is not None:
        if learned.settings is None:
            con.print("added parameters: measured initial values (no --distill)")
        for key, (first, last) in sorted(learned.losses.items()):
            con.print(f"  distill {key}: loss {first:.4f} -> {last:.4f}")
    if dry_run:
        con.print("dry run (--plan): nothing else was written")
    elif result.output is not None:
        con.print(f"[green]converted checkpoint written to {result.output}[/] ({len(result.files)} files)")


@main.command("eval")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--task", "task", type=click.Choice(["ppl", "mqar", "passkey", "all"]), default="all", show_default=True,
              help="Which evaluation to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or table.")
def eval_command(model_path: Path, task: str, as_json: bool, quiet: bool) -> None:
    """Score MODEL (an original or a converted checkpoint folder) on fixed-seed tasks.

    \b
    ppl      held-out byte perplexity (standard-library files never trained on)
    mqar     multi-query associative recall accuracy, by pairs and sequence length
    passkey  passkey retrieval accuracy, by context length
    Two runs print the same numbers. The tasks are byte-level (vocab 256), like the example model.
    """
    reporter = _Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from hydracc.evaluation.evaluate import TASKS, EvalSettings, count_batches, evaluate

        tasks = TASKS if task == "all" else (task,)
        settings = EvalSettings()
        with Progress(TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True, disable=quiet) as progress:
            bar = progress.add_task("eval", total=count_batches(tasks, settings))
            result = evaluate(model_path, tasks, settings, advance=lambda: progress.advance(bar))
        _print_scores(reporter.console, result)
        return {"status": "ok", **result.to_json()}

    report = _run_guarded(reporter, work)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def _print_scores(con: Console, result: Any) -> None:
    kind = "converted" if result.converted else "original"
    table = Table(title=f"{result.model} ({kind})", title_justify="left")
    table.add_column("task")
    table.add_column("setting")
    table.add_column("score", justify="right")
    scores = result.scores
    if "ppl" in scores:
        table.add_row("ppl", "held-out text", f"{scores['ppl']['ppl']:.3f} ({scores['ppl']['bits_per_byte']:.3f} bits/byte)")
    if "mqar" in scores:
        for cell, acc in scores["mqar"]["grid"].items():
            table.add_row("mqar", cell, f"{acc:.1%}")
        table.add_row("mqar", "all", f"{scores['mqar']['accuracy']:.1%}")
        if "first_query_accuracy" in scores["mqar"]:
            table.add_row("mqar", "first query of each sequence", f"{scores['mqar']['first_query_accuracy']:.1%}")
    if "passkey" in scores:
        for cell, acc in scores["passkey"]["by_length"].items():
            table.add_row("passkey", cell, f"{acc:.1%}")
    con.print(table)


@main.command("generate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 = greedy; otherwise sample at this temperature.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print the continuation and the numbers as JSON on stdout.")
def generate_command(model_path: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int, as_json: bool) -> None:
    """Continue --prompt with the converted checkpoint MODEL, using the hybrid cache.

    Prints the continuation, then tokens per second and the cache size: keys and values are
    kept only for the KV heads full heads use; linear heads keep a fixed-size state.
    """
    reporter = _Reporter(as_json, False)

    def work() -> dict[str, Any]:
        import time

        import torch
        from transformers import AutoTokenizer

        from hydracc.frontend.checkpoint import read_config
        from hydracc.runtime.cache import HybridCache
        from hydracc.runtime.loader import load

        root = model_path.parent if model_path.is_file() else model_path
        model = load(root)
        if not (root / "tokenizer.json").is_file() and not (root / "tokenizer_config.json").is_file():
            raise HydraError(f"{root} has no tokenizer files", hint="copy the original model's tokenizer.json next to the converted weights")
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] == 0:
            raise HydraError("--prompt is empty after tokenization")
        cache = HybridCache(model.config)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or None} if temperature > 0 else {"do_sample": False}
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, past_key_values=cache, pad_token_id=None, **sampling)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        element = next(p.element_size() for p in model.parameters())
        tokens = cache.get_seq_length()
        sites = read_config(root)["hydra"]["layers"]  # validated by load(); per layer KV heads and head dim
        full_kv = sum(2 * e["num_kv_heads"] * e["head_dim"] for e in sites) * element * tokens
        report = {
            "status": "ok", "model": str(root), "prompt": prompt, "continuation": text, "new_tokens": int(new.numel()),
            "seconds": round(seconds, 4), "tokens_per_second": round(new.numel() / seconds, 2) if seconds > 0 else None,
            "cache": {"tokens": tokens, "bytes": cache.nbytes(), "kv_bytes": cache.kv_nbytes(),
                      "full_attention_kv_bytes": full_kv},
        }
        if not as_json:
            click.echo(prompt + text)
        con = reporter.err if not as_json else reporter.console
        con.print(f"{new.numel()} tokens in {seconds:.2f} s ({report['tokens_per_second']} tokens/s); cache after {tokens} tokens: "
                  f"{_human_bytes(cache.nbytes())} ({_human_bytes(cache.kv_nbytes())} of keys/values, "
                  f"{_human_bytes(cache.nbytes() - cache.kv_nbytes())} of fixed-size state: linear heads, streaming windows) "
                  f"vs {_human_bytes(full_kv)} of keys/values with full attention everywhere")
        return report

    report = _run_guarded(reporter, work)
    if as_json:
        click.echo(json.dumps(report, indent=2))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise HydraError("ONNX export needs onnx, onnxscript and onnxruntime", hint="pip install 'hydracc[onnx]'") from exc


def _export_with_check(reporter: _Reporter, checkpoint: Path, out: Path | None, atol: float, check_tokens: int, force: bool) -> Any:
    _require_onnx()
    from hydracc.export.onnx import export_onnx

    with reporter.err.status("exporting prefill and decode graphs to ONNX and checking them with onnxruntime"):
        report = export_onnx(checkpoint, out, atol=atol, check_tokens=check_tokens, force=force)
    reporter.console.print(
        f"ONNX written to {report.path} ({', '.join(report.files)}); onnxruntime vs torch: prefill max |diff| "
        f"{report.prefill_max_diff:.3g}, decode max |diff| {report.decode_max_diff:.3g} over {report.decoded_tokens} tokens "
        f"(--atol {report.atol:g})"
    )
    return report


@main.command("export-onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Folder for the ONNX files (default: CHECKPOINT/onnx).")
@click.option("--atol", type=click.FloatRange(0.0), default=1e-4, show_default=True, help="Largest |onnxruntime - torch| accepted; above it the export fails (exit 2).")
@click.option("--check-tokens", type=click.IntRange(1), default=8, show_default=True, help="Tokens to decode through the decode graph in the check.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def export_onnx_command(checkpoint: Path, output: Path | None, atol: float, check_tokens: int, force: bool, as_json: bool) -> None:
    """Export the converted CHECKPOINT to ONNX: a prefill graph and a decode-step graph.

    \b
    prefill.onnx  input_ids, position_ids [batch, seq] -> logits, present.L.* (the hybrid cache)
    decode.onnx   input_ids, position_ids [batch, 1], past.L.* -> logits, present.L.*
    Per layer the cache is keys/values for the KV heads full heads use, and the linear heads'
    state/norm. Batch and lengths are dynamic; weights are fp32. Both graphs are checked with
    onnxruntime against hydracc on fresh random inputs (decoding --check-tokens tokens); a
    difference above --atol fails the command and leaves nothing at the output path.
    """
    reporter = _Reporter(as_json, False)

    def work() -> dict[str, Any]:
        report = _export_with_check(reporter, checkpoint, output, atol, check_tokens, force)
        return {"status": "ok", **report.to_json()}

    report = _run_guarded(reporter, work)
    if as_json:
        click.echo(json.dumps(report, indent=2))


@main.command("passes")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE", help="Load a file or module that registers passes first.")
def list_passes(plugins: tuple[str, ...]) -> None:
    """List the registered graph passes (built-in and from --plugin)."""
    reporter = _Reporter(False, False)

    def work() -> None:
        from hydracc.convert import load_plugins
        from hydracc.passes import registered_passes

        load_plugins(plugins)
        for p in registered_passes():
            click.echo(f"{p.name:16} {p.description}")

    _run_guarded(reporter, work)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
