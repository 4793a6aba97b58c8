"""``hydracc eval``: score an original or a converted checkpoint on fixed-seed tasks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hydracc.cli.common import (
    Reporter,
    allow_nonfinite_option,
    check_hashes_option,
    json_option,
    markup_escape,
    progress_bar,
    quiet_option,
    run_command,
)


@click.command("eval")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--task", "task", type=click.Choice(["ppl", "mqar", "passkey", "recall", "prose", "passkey_gen", "copy",
                                                  "kv_lookup", "all"]), default="all", show_default=True,
              help="Which evaluation to run (all: the model's default tasks, and recall with --recall).")
@click.option("--tasks", "tasks_list", metavar="A,B", help="Several tasks, comma-separated (overrides --task).")
@click.option("--samples", type=click.IntRange(1), default=None,
              help="Samples per cell (text tasks: at 1,024 tokens, scaled by 1024/length; default 4; mqar/passkey: "
                   "per cell, default 64/32).")
@click.option("--original", "original", type=click.Path(path_type=Path),
              help="For a converted MODEL: the original's report (hydracc eval ORIGINAL --json > FILE) or folder; "
                   "text-task cells the original scores below 50% are reported as not judged, and not run.")
@click.option("--recall", "recall", type=click.Path(path_type=Path),
              help="Also score the model's own recall probes: an .npz with ids_NAME and labels_NAME integer arrays "
                   "[rows, tokens] per set (labels -100 except at scored positions), e.g. examples/tiny-qwen/recall.npz.")
@click.option("--calib", type=click.Path(path_type=Path),
              help="Perplexity on this data (convert's --calib formats) instead of the built-in held-out text.")
@click.option("--device", default=None, help="Torch device to run on (default: cuda when available, else cpu).")
@allow_nonfinite_option()
@check_hashes_option()
@json_option("Print the scores as JSON on stdout.")
@quiet_option("No progress bar or table.")
def eval_command(model_path: Path, task: str, tasks_list: str | None, samples: int | None, original: Path | None,
                 recall: Path | None, calib: Path | None, device: str | None, allow_nonfinite: bool, check_hashes: bool, as_json: bool,
                 quiet: bool) -> None:
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

    \b
    Models with a real tokenizer (tokenizer.json, vocab >= 4,096) get, by default:
    prose        perplexity on held-out English prose (Python's reference docs, licence texts)
    passkey_gen  a 5-digit key in prose at 1k/2k/4k tokens, answered by generation (exact match)
    copy         a repeated 64-word span at 512-2k tokens, teacher-forced accuracy on the repeat
    kv_lookup    "The code for CITY is NNNN." lines at 1k/2k tokens, answered by generation
    An original's report lists the recall cells it fails (below_floor); give it to a converted
    model's eval with --original, and those cells are not judged.
    """
    reporter = Reporter(as_json, quiet)

    def work() -> dict[str, Any]:
        from hydracc.device import default_device
        from hydracc.evaluation.evaluate import EvalSettings, count_batches, default_tasks, evaluate
        from hydracc.pipeline.options import check_device

        check_device(device)
        if tasks_list:
            tasks = tuple(t.strip() for t in tasks_list.split(",") if t.strip())
        elif task == "all":
            tasks = default_tasks(model_path, recall is not None)
        else:
            tasks = (task,)
        settings = EvalSettings()
        if samples is not None:
            settings = replace(settings, mqar_samples=samples, passkey_samples=samples,
                               text=replace(settings.text, samples=samples))
        with progress_bar(reporter, "eval") as progress:
            bar = progress.add_task("eval", total=count_batches(tasks, settings, _probe_rows(recall)))
            result = evaluate(model_path, tasks, settings, advance=lambda: progress.advance(bar), calib=calib,
                              recall=recall, original=original, device=str(default_device(device)), allow_nonfinite=allow_nonfinite,
                              check_hashes=check_hashes)
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
    table = Table(title=f"{markup_escape(result.model)} ({kind})", title_justify="left")
    table.add_column("task")
    table.add_column("setting")
    table.add_column("score", justify="right")
    scores = result.scores
    if "ppl" in scores:
        ppl = scores["ppl"]
        unit = "byte" if "bits_per_byte" in ppl else "token"
        table.add_row("ppl", markup_escape(ppl.get("text", "held-out text")), f"{ppl['ppl']:.3f} ({ppl[f'bits_per_{unit}']:.3f} bits/{unit})")
    if "mqar" in scores:
        for cell, acc in scores["mqar"]["grid"].items():
            table.add_row("mqar", markup_escape(cell), f"{acc:.1%}")
        for cell, acc in scores["mqar"].get("by_length", {}).items():
            table.add_row("mqar", markup_escape(f"{cell}, all pairs"), f"{acc:.1%}")
        table.add_row("mqar", "all", f"{scores['mqar']['accuracy']:.1%}")
        if "first_query_accuracy" in scores["mqar"]:
            table.add_row("mqar", "first query of each sequence", f"{scores['mqar']['first_query_accuracy']:.1%}")
    if "passkey" in scores:
        for cell, acc in scores["passkey"]["by_length"].items():
            table.add_row("passkey", markup_escape(cell), f"{acc:.1%}")
    if "recall" in scores:
        rec = scores["recall"]
        for cell, acc in rec["by_set"].items():
            table.add_row("recall", markup_escape(f"{rec['file']}: {cell}"), f"{acc:.1%}")
        table.add_row("recall", "first answer of each row", f"{rec['first_answer_accuracy']:.1%}")
    if "prose" in scores:
        pr = scores["prose"]
        table.add_row("prose", markup_escape(f"{pr['windows']} x {pr['seq_len']} tokens"),
                      f"{pr['ppl']:.3f} ({pr['bits_per_token']:.3f} bits/token)")
    for name in ("passkey_gen", "copy", "kv_lookup"):
        if name in scores:
            res = scores[name]
            for cell, acc in res["by_length"].items():
                fails = " (below the 50% floor)" if cell in res.get("below_floor", ()) else ""
                table.add_row(name, markup_escape(f"{cell}, {res['samples'][cell]} samples{fails}"), f"{acc:.1%}")
            for cell, why in res.get("not_judged", {}).items():
                table.add_row(name, markup_escape(cell), markup_escape(f"not judged: {why}"))
    con.print(table)
