"""``hydracc verify``: the release gate, a converted checkpoint against the original it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from hydracc.cli.common import (
    Reporter,
    allow_nonfinite_option,
    check_hashes_option,
    json_option,
    markup_escape,
    quiet_option,
    run_command,
)
from hydracc.errors import EXIT_GATE_FAILED
from hydracc.evaluation.verify import MIN_ORIGINAL_RECALL, Thresholds, VerifySettings

_DEFAULTS = Thresholds()


@click.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("converted", type=click.Path(path_type=Path))
@click.option("--max-ppl-increase", type=click.FloatRange(0.0), default=_DEFAULTS.max_ppl_increase, show_default=True,
              help="Largest accepted relative perplexity increase (0.10: at most 10% higher).")
@click.option("--min-recall-ratio", type=click.FloatRange(0.0, 10.0), default=_DEFAULTS.min_recall_ratio, show_default=True,
              help="Smallest accepted converted / original accuracy on the recall probes "
                   f"(judged only when the original reaches {MIN_ORIGINAL_RECALL:.0%}).")
@click.option("--min-agreement", type=click.FloatRange(0.0, 1.0), default=_DEFAULTS.min_agreement, show_default=True,
              help="Smallest accepted share of positions where both models predict the same next token.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Data for perplexity and agreement (--calib formats of convert). Default: held-out text in the model's tokens.")
@click.option("--samples", type=click.IntRange(1), default=VerifySettings.samples, show_default=True, help="Rows of text.")
@click.option("--seq-len", type=click.IntRange(8), default=VerifySettings.seq_len, show_default=True, help="Tokens per row.")
@click.option("--device", default=None, help="Torch device to run both models on (default: cuda when available, else cpu).")
@click.option("--update-card", is_flag=True,
              help="Write the figures into CONVERTED/README.md (its Verification section, replacing an earlier one), "
                   "whether or not the gate passes; the card is replaced atomically.")
@allow_nonfinite_option()
@check_hashes_option()
@json_option("Print every figure and threshold as JSON on stdout.")
@quiet_option("Print nothing but errors (and the --json report).")
def verify_command(original: Path, converted: Path, max_ppl_increase: float, min_recall_ratio: float, min_agreement: float,
                   calib: Path | None, samples: int, seq_len: int, device: str | None, update_card: bool,
                   allow_nonfinite: bool, check_hashes: bool, as_json: bool, quiet: bool) -> None:
    """Check the converted checkpoint CONVERTED against ORIGINAL, the checkpoint it was converted from,
    on the same fixed-seed data: perplexity, recall, and agreement of next-token predictions.

    \b
    Exit codes: 0 every threshold holds; 3 one fails (the report says which);
    2 bad input (the pair does not belong together by its recorded input hashes, a bad path, ...).
    Two runs give the same figures.
    """
    reporter = Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from hydracc.evaluation.verify import verify
        from hydracc.pipeline.options import check_device

        thresholds = Thresholds(max_ppl_increase, min_recall_ratio, min_agreement)
        if device is not None:
            check_device(device)
        if update_card:
            from hydracc.evaluation.verify import card_path

            card_path(converted)  # before running the models
        with reporter.err.status("running both models on the verification data"):
            report = verify(original, converted, thresholds=thresholds, calib=calib, device=device,
                            settings=VerifySettings(samples=samples, seq_len=seq_len), allow_nonfinite=allow_nonfinite,
                            check_hashes=check_hashes)
        _print(reporter, report)
        extra: dict[str, Any] = {}
        if update_card:
            from hydracc.evaluation.verify import update_card as write_card

            extra["card"] = str(write_card(converted, report))
            reporter.console.print(f"figures written into {markup_escape(extra['card'])}")
        return {"status": "ok" if report.passed else "failed", **report.to_json(), **extra}

    result = run_command(reporter, work)
    if result["status"] != "ok":
        raise SystemExit(EXIT_GATE_FAILED)


def _print(reporter: Reporter, report: Any) -> None:
    f = report.figures
    table = Table(title=markup_escape(f"verify {report.converted} against {report.original} ({report.data}; {report.device})"),
                  title_justify="left")
    for col in ("check", "original", "converted", "value", "threshold", "result"):
        table.add_column(col, justify="left" if col in ("check", "result") else "right")
    c = report.checks
    table.add_row("ppl increase", f"{f['ppl']['original']:.4f}", f"{f['ppl']['converted']:.4f}", f"{c['ppl_increase']['value']:+.1%}",
                  f"<= {c['ppl_increase']['threshold']:.1%}", _result(c["ppl_increase"]))
    rr = c["recall_ratio"]
    table.add_row(markup_escape(f"recall ratio ({f['recall_probe']})"), f"{f['recall_accuracy']['original']:.1%}",
                  f"{f['recall_accuracy']['converted']:.1%}", "-" if rr["value"] is None else f"{rr['value']:.3f}",
                  f">= {rr['threshold']:.3f}", _result(rr))
    table.add_row("top-1 agreement", "", "", f"{c['agreement']['value']:.1%}", f">= {c['agreement']['threshold']:.1%}",
                  _result(c["agreement"]))
    reporter.console.print(table)
    if not rr.get("judged", True):
        reporter.console.print(f"recall not judged: {markup_escape(rr['why_not_judged'])}")
    reporter.console.print("[green]passed[/]" if report.passed else "[bold red]failed[/]: a threshold does not hold (exit 3)")


def _result(check: dict[str, Any]) -> str:
    if not check.get("judged", True):
        return "not judged"
    return "ok" if check["ok"] else "FAIL"
