"""``hydracc eval``: score an original or a converted checkpoint on fixed-seed tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hydracc.cli.common import Reporter, json_option, progress_bar, quiet_option, run_command


@click.command("eval")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--task", "task", type=click.Choice(["ppl", "mqar", "passkey", "all"]), default="all", show_default=True,
              help="Which evaluation to run.")
@json_option("Print the scores as JSON on stdout.")
@quiet_option("No progress bar or table.")
def eval_command(model_path: Path, task: str, as_json: bool, quiet: bool) -> None:
    """Score MODEL (an original or a converted checkpoint folder) on fixed-seed tasks.

    \b
    ppl      held-out byte perplexity (standard-library files never trained on)
    mqar     multi-query associative recall accuracy, by pairs and sequence length
    passkey  passkey retrieval accuracy, by context length
    Two runs print the same numbers. The tasks are byte-level (vocab 256), like the example model.
    """
    reporter = Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from hydracc.evaluation.evaluate import TASKS, EvalSettings, count_batches, evaluate

        tasks = TASKS if task == "all" else (task,)
        settings = EvalSettings()
        with progress_bar(reporter, "eval") as progress:
            bar = progress.add_task("eval", total=count_batches(tasks, settings))
            result = evaluate(model_path, tasks, settings, advance=lambda: progress.advance(bar))
        print_scores(reporter.console, result)
        return {"status": "ok", **result.to_json()}

    run_command(reporter, work)


def print_scores(con: Console, result: Any) -> None:
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
