"""``hydracc convert``: parse the options (generated from ``ConvertOptions``), run the conversion, print."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from hydracc.cli.common import (
    LazyChoice,
    Reporter,
    human_bytes,
    json_option,
    markup_escape,
    plan_table,
    print_calibration,
    quiet_option,
    rich_hooks,
    run_command,
    scores_table,
    sites_table,
)
from hydracc.pipeline.options import ConvertOptions


def _click_type(meta: Any) -> Any:
    kind, choices = meta["type"], meta["choices"]
    if choices is not None:
        return LazyChoice(choices) if callable(choices) else click.Choice(list(choices))
    if kind is Path:
        return click.Path(path_type=Path)
    if kind is int:
        return click.IntRange(meta["min"], meta["max"]) if meta["min"] is not None or meta["max"] is not None else int
    if kind is float:
        if meta["min"] is not None or meta["max"] is not None:
            return click.FloatRange(meta["min"], meta["max"], min_open=meta["min_open"])
        return float
    return None


def option_params(cls: type = ConvertOptions) -> list[click.Parameter]:
    """One click parameter per ``ConvertOptions`` field, in field order (the argument first)."""
    params: list[click.Parameter] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta["argument"]:
            params.append(click.Argument([f.name], type=_click_type(meta)))
            continue
        decls = [*meta["flags"], f.name]
        kwargs: dict[str, Any] = {"help": meta["help"]}
        if meta["secondary"]:
            decls = [f"{meta['flags'][0]}/{meta['secondary']}", f.name]
            kwargs.update(default=f.default, show_default=meta["show_default"])
        elif meta["type"] is bool:
            kwargs.update(is_flag=True)
        elif meta["multiple"]:
            kwargs.update(multiple=True, metavar=meta["metavar"])
        else:
            kwargs.update(type=_click_type(meta), default=f.default)
            if f.default is not None and meta["show_default"]:
                kwargs["show_default"] = True
        params.append(click.Option(decls, **kwargs))
    return params


def convert_options(fn: Any) -> Any:
    """Decorator: add every ``ConvertOptions`` field as a click parameter."""
    fn.__click_params__ = [*getattr(fn, "__click_params__", []), *reversed(option_params())]
    return fn


@click.command("convert")
@convert_options
@json_option("Print a JSON report (or error) on stdout; tables go to stderr.")
@quiet_option("Print nothing but errors (and the --json report).")
def convert_command(as_json: bool, quiet: bool, **fields: Any) -> None:
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

    
    Several processes: `torchrun --nproc-per-node N -m hydracc convert ...` splits the
    calibration rows of the analysis and of --distill across N processes (gloo on CPUs,
    NCCL on GPUs, one GPU each); rank 0 alone prints and writes.
    """
    from hydracc.distributed import env_is_main

    main = env_is_main()
    reporter = Reporter(as_json and main, quiet or not main)

    def work() -> dict[str, Any]:
        from hydracc.pipeline.run import run_conversion

        options = ConvertOptions(**fields)
        hooks = rich_hooks(reporter, converted=lambda result: print_result(reporter, result, options))
        result = run_conversion(options, progress=hooks, style="cli")
        if result.onnx is not None:
            print_onnx(reporter, result.onnx)
        return result.to_json()

    run_command(reporter, work)


def print_onnx(reporter: Reporter, report: Any) -> None:
    reporter.console.print(
        f"ONNX written to {markup_escape(report.path)} ({markup_escape(', '.join(report.files))}); onnxruntime vs torch: prefill max |diff| "
        f"{report.prefill_max_diff:.3g}, decode max |diff| {report.decode_max_diff:.3g} over {report.decoded_tokens} tokens "
        f"(--atol {report.atol:g})"
    )


STABLE = 0.8
"""Below this share of agreeing resamples, ``--plan`` warns that the decision is unsure."""


def print_result(reporter: Reporter, result: Any, options: ConvertOptions) -> None:
    con = reporter.console
    insp, cost = result.inspection, result.cost
    con.print(f"[bold]{markup_escape(insp.captured.config.model_type)}[/] model at {markup_escape(insp.checkpoint.root)}: "
              f"{len(insp.captured.sites)} attention sites, weights {', '.join(sorted(str(d).removeprefix('torch.') for d in insp.checkpoint.dtypes()))}")
    if insp.dropped:
        con.print(f"dropping {len(insp.dropped)} tensor(s) transformers ignores on load: "
                  f"{markup_escape(', '.join(insp.dropped[:4]))}"
                  + (" ..." if len(insp.dropped) > 4 else ""))
    con.print(sites_table(insp))
    if result.analysis is not None:
        con.print(scores_table(result.analysis, result.plan))
        print_calibration(con, result.analysis)
    con.print(plan_table(result.plan))
    b = result.plan.budget
    if "full_units" in b and "strategy" not in b:  # a plan file edited after planning: only the counts are known
        con.print(f"plan file: {b['full_units']} of {b['total_units']} {result.plan.unit.replace('_', ' ')}s full, "
                  f"{b['kv_fraction_used']:.1%} of the KV cache")
    elif "full_units" in b:
        how = b["strategy"] + (f" by {b['score']}" if "score" in b else "") + (f" (seed {b['seed']})" if "seed" in b else "")
        asked = f"--full-ratio {b['full_ratio']}" if b.get("full_ratio") is not None else f"--kv-budget {b.get('kv_budget')}"
        con.print(f"budget ({asked}): {b['full_units']} of {b['total_units']} {result.plan.unit.replace('_', ' ')}s full, "
                  f"{b['kv_fraction_used']:.1%} of the KV cache; strategy {markup_escape(how)}")
    if b.get("full_decided_by"):
        con.print("full units decided by " + markup_escape("; ".join(f"{k}: {', '.join(v)}" for k, v in b["full_decided_by"].items())))
    sure = b.get("stability")
    if sure:
        m = sure.get("margin") or {}
        edge = (f"; at the cut {m['kept']} (kept) {m.get('kept_value', '')} vs {m['dropped']} (dropped) "
                f"{m.get('dropped_value', '')} by {m['score']}") if m else ""
        con.print(f"stability: {sure['agree']:.0%} of {sure['resamples']} bootstrap resamples of the calibration rows keep "
                  f"the same full units{markup_escape(edge)}")
        if sure["resamples"] and sure["agree"] < STABLE:
            con.print(f"[yellow]warning:[/] under {STABLE:.0%} of resamples agree: the plan depends on which calibration "
                      "rows were drawn; give more or more representative rows (--calib, --calib-samples)")
    con.print(
        f"KV cache per token: {human_bytes(cost.kv_bytes_per_token_before)} before -> "
        f"{human_bytes(cost.kv_bytes_per_token_after)} after ({cost.ratio:.1%}); "
        f"converted heads add a fixed {human_bytes(cost.linear_state_bytes)} per sequence (linear states, streaming windows)"
    )
    if options.plan_out is not None:
        con.print(f"plan written to {markup_escape(options.plan_out)}")
    if options.plan_png is not None:
        con.print(f"plan picture written to {markup_escape(options.plan_png)}")
    if result.rewrite is not None:
        con.print(f"passes: {markup_escape(', '.join(result.rewrite.passes))}")
        for note in result.rewrite.context.notes:
            con.print(f"  {markup_escape(note)}")
    learned = result.learned
    if learned is not None:
        if learned.settings is None:
            con.print("added parameters: measured initial values (no --distill)")
        for key, (first, last) in sorted(learned.losses.items()):
            what = "held-out loss, start -> best" if key.startswith("held_out") else "loss"
            con.print(f"  distill {markup_escape(key)}: {what} {first:.4f} -> {last:.4f}")
        held = learned.held_out
        if held:
            steps = ", ".join(f"{v:.4f}" for _, v in held.get("end_to_end", []))
            con.print(f"  held-out KL per token on {held['rows']} rows never trained on: start "
                      f"{held.get('initial', float('nan')):.4f}, after attention transfer {held['attention_transfer']:.4f}"
                      + (f", end to end {steps}" if steps else "") + f"; kept: {markup_escape(held['kept'])} ({held['kept_kl']:.4f})")
    if options.dry_run:
        con.print("dry run (--plan): nothing else was written")
    elif result.output is not None:
        con.print(f"[green]converted checkpoint written to {markup_escape(result.output)}[/] ({len(result.files)} files)")
