"""``hydracc eval``: score an original or a converted checkpoint on fixed-seed tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hydracc.cli.common import Reporter, allow_nonfinite_option, json_option, progress_bar, quiet_option, run_command


@click.command("eval")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--task", "task", type=click.Choice(["ppl", "mqar", "passkey", "recall", "all"]), default="all",
              show_default=True, help="Which evaluation to run (all: the built-in three, and recall with --recall).")
@click.option("--recall", "recall", type=click.Path(path_type=Path),
              help="Also score the model's own recall probes: an .npz with ids_NAME and labels_NAME integer arrays "
                   "[rows, tokens] per set (labels -100 except at scored positions), e.g. examples/tiny-qwen/recall.npz.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Perplexity on this data (convert's --calib formats) instead of the built-in held-out text.")
@click.option("--device", default=None, help="Torch device to run on (default: cuda when available, else cpu).")
@allow_nonfinite_option()
@json_option("Print the scores as JSON on stdout.")
@quiet_option("No progress bar or table.")
def eval_command(model_path: Path, task: str, recall: Path | None, calib: Path | None, device: str | None,
                 allow_nonfinite: bool, as_json: bool, quiet: bool) -> None:
    """Score MODEL (an original or a converted checkpoint folder) on fixed-seed tasks.

    \b
    ppl      held-out perplexity (standard-library files never trained on, or --calib data)
    mqar     multi-query associative recall accuracy, by pairs and sequence length (128-1024:
             512 and up is beyond what a 64-token streaming window can hold)
    passkey  passkey retrieval accuracy, by context length
    recall   accuracy on the model's own recall probes (--recall FILE.npz), per set
    Two runs print the same numbers. Byte-level models (vocab 256, like the example model) get
    the byte tasks; other vocabularies the same tasks in their own tokens (text through the
    checkpoint's tokenizer.json; recall and passkey from ordinary ids).
    """
    reporter = Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from hydracc.device import default_device
        from hydracc.evaluation.evaluate import TASKS, EvalSettings, count_batches, evaluate
        from hydracc.pipeline.options import check_device

        check_device(device)
        tasks = (TASKS + (("recall",) if recall is not None else ())) if task == "all" else (task,)
        settings = EvalSettings()
        with progress_bar(reporter, "eval") as progress:
            bar = progress.add_task("eval", total=count_batches(tasks, settings, _probe_rows(recall)))
            result = evaluate(model_path, tasks, settings, advance=lambda: progress.advance(bar), calib=calib,
                              recall=recall, device=str(default_device(device)), allow_nonfinite=allow_nonfinite)
        print_scores(reporter.console, result)
        return {"status": "ok", **result.to_json()}

    run_command(reporter, work)


def _probe_rows(path: Path | None) -> tuple[int, ...]:
    """Rows per probe set, for the progress bar (a bad file is reported by ``evaluate``)."""
    if path is None:
        return ()
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return tuple(int(z[k].shape[0]) for k in z.files if k.startswith("ids_") and z[k].ndim)
    except Exception:
        return ()


def print_scores(con: Console, result: Any) -> None:
    kind = "converted" if result.converted else "original"
    table = Table(title=f"{result.model} ({kind})", title_justify="left")
    table.add_column("task")
    table.add_column("setting")
    table.add_column("score", justify="right")
    scores = result.scores
    if "ppl" in scores:
        ppl = scores["ppl"]
        unit = "byte" if "bits_per_byte" in ppl else "token"
        table.add_row("ppl", ppl.get("text", "held-out text"), f"{ppl['ppl']:.3f} ({ppl[f'bits_per_{unit}']:.3f} bits/{unit})")
    if "mqar" in scores:
        for cell, acc in scores["mqar"]["grid"].items():
            table.add_row("mqar", cell, f"{acc:.1%}")
        for cell, acc in scores["mqar"].get("by_length", {}).items():
            table.add_row("mqar", f"{cell}, all pairs", f"{acc:.1%}")
        table.add_row("mqar", "all", f"{scores['mqar']['accuracy']:.1%}")
        if "first_query_accuracy" in scores["mqar"]:
            table.add_row("mqar", "first query of each sequence", f"{scores['mqar']['first_query_accuracy']:.1%}")
    if "passkey" in scores:
        for cell, acc in scores["passkey"]["by_length"].items():
            table.add_row("passkey", cell, f"{acc:.1%}")
    if "recall" in scores:
        rec = scores["recall"]
        for cell, acc in rec["by_set"].items():
            table.add_row("recall", f"{rec['file']}: {cell}", f"{acc:.1%}")
        table.add_row("recall", "first answer of each row", f"{rec['first_answer_accuracy']:.1%}")
    con.print(table)
