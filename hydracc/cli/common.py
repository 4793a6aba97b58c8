"""What every command shares, once: the reporter, error handling and exit codes, ``--json``/``-q``, progress bars, tables.

Design decisions:
- Exit codes: 0 success; 2 bad input (unreadable checkpoint, unsupported architecture,
  invalid plan, output exists, bad option); 1 an internal error (a bug: please report);
  3 a ``verify`` threshold does not hold; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM,
  handled like Ctrl-C: nothing half-written is left). Once the first SIGTERM or Ctrl-C is handled, further ones are
  ignored: a second signal (``timeout``, Ctrl-C pressed twice) cannot undo the clean-up or change the exit code.
  Errors are one clear message on stderr, never a traceback (``HYDRACC_DEBUG=1`` shows it).
- Messages and user text (paths, names) are printed as they are, never read as rich markup (``markup_escape``).
- ``--json`` prints one JSON document on stdout (the report or the error) and sends the
  human-readable tables and progress to stderr, so scripts can parse stdout as is.
- A command is ``run_command(reporter, work)``: ``work`` does the job by calling the pipeline
  and returns the JSON report; this module guards it and prints the report.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from hydracc.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, HydraError, Terminated

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "Reporter", "markup_escape", "run_command", "run_guarded"]


_first_signal: int | None = None
"""The SIGTERM or SIGINT being handled (its clean-up under way), or ``None``."""
_ours: set[int] = set()
"""The signals ``handle_sigterm`` handles (SIGINT not when the process was started ignoring it)."""


def _on_signal(signum: int, frame: Any) -> None:
    """The first SIGTERM/SIGINT unwinds (``Terminated``/``KeyboardInterrupt``); later ones are ignored, so that a
    second signal (``timeout``, a twice-pressed Ctrl-C) cannot interrupt the first one's clean-up."""
    global _first_signal
    if _first_signal is not None:  # one that was already pending when the first ran
        return
    import signal

    _first_signal = signum
    for other in _ours:  # ignored from now on, through the interpreter's own shutdown too, which would otherwise
        signal.signal(other, signal.SIG_IGN)  # restore the default action (killed by the signal: not 143 or 130)
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def handle_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (temporary outputs removed, a message, exit 143) instead of killing the process,
    and make a second SIGTERM or Ctrl-C wait for the first one's clean-up (exit 143 or 130 all the same)."""
    import signal

    global _first_signal
    _first_signal = None
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signum == signal.SIGINT and signum not in _ours and signal.getsignal(signum) is signal.SIG_IGN:
            continue  # a background job started ignoring Ctrl-C keeps ignoring it
        try:
            signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread (an embedding application): leave its signals alone
            return
        _ours.add(signum)


def markup_escape(value: object) -> str:
    """``value`` as text that rich prints as is: user paths and messages are never read as markup (``model[v2]``)."""
    from rich.markup import escape

    return escape(str(value))


def json_option(help: str) -> Any:
    return click.option("--json", "as_json", is_flag=True, help=help)


def allow_nonfinite_option() -> Any:
    return click.option("--allow-nonfinite", is_flag=True,
                        help="Accept weights holding NaN or infinity (refused by default: every output of them is meaningless).")


def check_hashes_option() -> Any:
    return click.option("--no-check-hashes", "check_hashes", is_flag=True, flag_value=False, default=True,
                        help="Use a converted checkpoint whose weights differ from the digests its config records "
                             "(edited after conversion; refused by default).")


def quiet_option(help: str) -> Any:
    return click.option("-q", "--quiet", is_flag=True, help=help)


class Reporter:
    """Where a command's output goes: ``console`` (stdout, or stderr under ``--json``; silent with ``-q``) and ``err``."""

    def __init__(self, as_json: bool, quiet: bool) -> None:
        self.as_json = as_json
        stream = sys.stderr if as_json else sys.stdout
        width = None if stream.isatty() else 120  # rich's 80-column default would cut module paths
        self.console = Console(stderr=as_json, quiet=quiet, highlight=False, width=width)
        self.err = Console(stderr=True, highlight=False)

    @property
    def quiet(self) -> bool:
        return bool(self.console.quiet)

    def fail(self, message: str, code: int) -> None:
        if self.as_json:
            click.echo(json.dumps({"status": "error", "exit_code": code, "error": message}))
        self.err.print(f"[bold red]error:[/] {markup_escape(message)}", markup=True, highlight=False, soft_wrap=True)
        sys.exit(code)


def run_guarded(reporter: Reporter, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; turn a ``HydraError`` (its exit code), Ctrl-C (130) or a bug (1) into one message and an exit."""
    try:
        return fn()
    except HydraError as exc:
        reporter.fail(str(exc), exc.exit_code)
    except Terminated as exc:
        reporter.fail(str(exc) or "terminated (SIGTERM); nothing was written to the output path", EXIT_TERMINATED)
    except KeyboardInterrupt as exc:
        reporter.fail(str(exc) or "interrupted; nothing was written to the output path", EXIT_INTERRUPTED)
    except Exception as exc:  # a bug, not the user's fault
        if os.environ.get("HYDRACC_DEBUG") == "1":
            traceback.print_exc()
        reporter.fail(
            f"internal error: {type(exc).__name__}: {exc} (set HYDRACC_DEBUG=1 for the traceback, and please report it)",
            EXIT_INTERNAL,
        )


def run_command(reporter: Reporter, work: Callable[[], Any]) -> Any:
    """The skeleton of every command: run ``work`` guarded, then print its report under ``--json``."""
    report = run_guarded(reporter, work)
    if reporter.as_json:
        from hydracc.emit.writer import json_safe

        click.echo(json.dumps(json_safe(report), indent=2, allow_nan=False))  # strict JSON: NaN scores become null
    return report


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices are read on first use (the kind table imports torch)."""

    def __init__(self, choices: Callable[[], Any], case_sensitive: bool = True) -> None:
        self._source = choices
        self.case_sensitive = case_sensitive

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._source())


def linear_kind_type() -> LazyChoice:
    """The converted-head kinds from the kind table (``hydracc.kernels.kinds``), never typed here."""
    from hydracc.pipeline.options import linear_kind_choices

    return LazyChoice(linear_kind_choices)


# --- progress ------------------------------------------------------------------------------

def progress_bar(reporter: Reporter, kind: str) -> Any:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if kind == "analyze":
        columns: tuple[Any, ...] = (TextColumn("analyzing heads"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    TimeRemainingColumn())
    elif kind in ("distill", "initialise"):
        label = "distilling" if kind == "distill" else "initialising added parameters"
        columns = (TextColumn(label + " {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    elif kind == "write":
        columns = (TextColumn("writing"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    elif kind == "eval":
        columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    else:  # pragma: no cover
        raise ValueError(kind)
    return Progress(*columns, console=console, transient=True, disable=reporter.quiet)


def rich_hooks(reporter: Reporter, converted: Callable[[Any], None] | None = None) -> Any:
    """``ProgressHooks`` drawing rich bars on stderr (nothing with ``-q``); ``converted`` gets the result when it is ready."""
    from hydracc.pipeline.run import ProgressHooks

    class RichHooks(ProgressHooks):
        def __init__(self) -> None:
            self.progress: Any = None
            self.status: Any = None
            self.tasks: dict[str, Any] = {}

        def begin(self, stage: str, total: int | None = None) -> None:
            if stage == "onnx":
                self.status = reporter.err.status("exporting prefill and decode graphs to ONNX and checking them with onnxruntime")
                self.status.__enter__()
                return
            self.progress = progress_bar(reporter, stage)
            self.progress.__enter__()
            self.tasks = {}
            if stage in ("analyze", "write"):
                self.tasks[stage] = self.progress.add_task(stage, total=total)

        def end(self, stage: str) -> None:
            if stage == "onnx":
                if self.status is not None:
                    self.status.__exit__(None, None, None)
                self.status = None
                return
            if self.progress is not None:
                self.progress.__exit__(None, None, None)
            self.progress = None

        def analyzed(self, done: int, total: int) -> None:
            self.progress.update(self.tasks["analyze"], completed=done, total=total)

        def distilled(self, stage: str, step: int, steps: int, loss: float) -> None:
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(stage, total=steps, loss="-")
            self.progress.update(self.tasks[stage], completed=step, loss=f"{loss:.4f}")

        def wrote(self, name: str, nbytes: int) -> None:
            self.progress.advance(self.tasks["write"], nbytes)

        def converted(self, result: Any) -> None:
            if converted is not None:
                converted(result)

    return RichHooks()


# --- tables and numbers ----------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def kinds_cell(kinds: list[str]) -> str:
    """One character per head: its kind's ``symbol``."""
    from hydracc.kernels.kinds import kind_by_name

    return " ".join(kind_by_name(k).symbol for k in kinds)


def sites_table(inspection: Any) -> Table:
    table = Table(title="Attention sites found in the captured graph", title_justify="left")
    for col in ("layer", "module", "attention", "q heads", "kv heads", "group", "head dim", "scale", "mask"):
        table.add_column(col, justify="right" if col not in ("module", "attention", "mask") else "left")
    for s in inspection.captured.sites:
        table.add_row(
            str(s.layer), markup_escape(s.module), markup_escape(s.attention_kind), str(s.num_heads), str(s.num_kv_heads),
            str(s.group_size), str(s.head_dim), f"{s.scale:.4g}", "causal" if s.causal else "?",
        )
    return table


def plan_table(plan: Any) -> Table:
    table = Table(title="Plan: head kinds per layer (F full softmax, e elu, h hedgehog, g gdn, s streaming)", title_justify="left")
    for col in ("layer", "module", "heads", "full", "converted", "KV heads cached"):
        table.add_column(col, justify="left" if col in ("module", "heads") else "right")
    for lp in plan.layers:
        full = len(lp.full_heads())
        table.add_row(
            str(lp.layer), markup_escape(lp.module), markup_escape(kinds_cell(lp.kinds)), str(full), str(lp.num_heads - full),
            f"{len(lp.cached_kv_heads())}/{lp.num_kv_heads}",
        )
    return table


def scores_table(analysis: Any, plan: Any | None) -> Table:
    title = "Head scores" + (" and decisions" if plan is not None else "") + f" (unit: {analysis.unit.replace('_', ' ')})"
    table = Table(title=title, title_justify="left")
    ranked = any(ls.unit_priority for ls in analysis.layers)
    cols = ["layer", "head", "unit", "retrieval", "distance", "sink", "entropy", "lin_err", "KL", "recall"]
    if ranked:
        cols += ["rank", "by"]
    if plan is not None:
        cols.append("kind")
    for col in cols:
        table.add_column(col, justify="left" if col in ("kind", "by") else "right")
    for ls in analysis.layers:
        group = ls.num_heads // ls.num_kv_heads if ls.grouped else 1
        kinds = plan.layer(ls.layer).kinds if plan is not None else None
        for h, sc in enumerate(ls.heads):
            row = [str(ls.layer), str(h), f"g{h // group}" if ls.grouped else "-", f"{sc.retrieval:.3f}", f"{sc.distance:.1f}",
                   f"{sc.sink:.3f}", f"{sc.entropy:.3f}", f"{sc.linear_error:.3f}", f"{sc.sensitivity:.2e}",
                   f"{sc.recall:.2e}"]
            if ranked:
                u = h // group
                row += [str(ls.unit_priority[u] + 1) if u < len(ls.unit_priority) else "-",
                        markup_escape(ls.unit_decided_by[u]) if u < len(ls.unit_decided_by) else ""]
            if kinds is not None:
                row.append("[bold]FULL[/]" if kinds[h] == "full" else markup_escape(kinds[h]))
            table.add_row(*row, end_section=h == ls.num_heads - 1)
    return table


def print_calibration(con: Console, analysis: Any) -> None:
    cal = analysis.calibration
    con.print(f"calibration: {markup_escape(cal['source'])} ({cal['samples']} x {cal['seq_len']} tokens)")
    obj = analysis.extra.get("objective") or {}
    if obj:
        acc = f"the original predicts {obj['original_recall_accuracy']:.1%} of {obj['recall_positions']} recall positions"
        con.print(f"objective: {markup_escape(obj['name'])} ({acc}); KL = output KL over all tokens, recall = cross-entropy change at "
                  "recall positions; rank = keep-first order, by = the score that placed the unit (joint: re-measured "
                  "together at the cut line)")
        if obj.get("fell_back_to_kl"):
            con.print(f"[yellow]warning:[/] ranked by KL instead of recall: {markup_escape(obj['fell_back_to_kl'])}")
