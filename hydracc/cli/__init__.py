"""The ``hydracc`` command line: one small module per command, the shared skeleton in ``common``.

Design decisions:
- Thin: a command parses its options, calls the pipeline (``hydracc.pipeline``: the one
  ``run_conversion``, or a stage function) and prints; nothing here computes anything a
  Python user could not get. ``convert``'s options are generated from ``ConvertOptions``.
- Exit codes, ``--json`` and error messages are handled once, in ``common`` (see there).
"""

from __future__ import annotations

import sys

import click

import hydracc
from hydracc.cli.analyze import analyze_command
from hydracc.cli.common import EXIT_INTERRUPTED, EXIT_TERMINATED, handle_sigterm
from hydracc.cli.convert import convert_command
from hydracc.cli.eval import eval_command
from hydracc.cli.export_onnx import export_onnx_command
from hydracc.cli.generate import generate_command
from hydracc.cli.passes import passes_command
from hydracc.cli.verify import verify_command

__all__ = ["EXIT_INTERRUPTED", "main"]


class _Group(click.Group):
    """The ``hydracc`` group: a signal that lands outside a command's guard (while the report is printed, say) still
    exits 130/143 quietly, not with click's ``Aborted!`` and exit 1."""

    def invoke(self, ctx: click.Context) -> object:
        from hydracc.errors import Terminated

        try:
            return super().invoke(ctx)
        except Terminated:
            click.echo("error: terminated (SIGTERM)", err=True)
            raise click.exceptions.Exit(EXIT_TERMINATED) from None
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(hydracc.__version__, prog_name="hydracc")
def main() -> None:
    """hydracc turns a pretrained transformer into a head-level hybrid: some attention heads keep
    full softmax attention, the others become linear attention with a fixed-size state.

    \b
    Typical use:
      hydracc convert model/ --plan                 # dry run: what would change, KV cache before/after
      hydracc convert model/ -o out/                # convert; out/ is a normal safetensors checkpoint
      hydracc convert model/ -o out/ --plan-file p.json --json   # in CI: a given plan, JSON report

    Exit codes: 0 ok, 2 bad input (nothing written), 1 internal error, 3 verify failed,
    130 interrupted, 143 terminated (SIGTERM; cleaned up like Ctrl-C).
    """
    handle_sigterm()


for _command in (convert_command, analyze_command, eval_command, generate_command, export_onnx_command, verify_command,
                 passes_command):
    main.add_command(_command)


def __getattr__(name: str) -> object:
    """Old names of ``hydracc/cli.py`` (before the package), with a warning. ``hydracc.cli.convert`` and
    ``hydracc.cli.analyze`` are now the commands' modules: their commands are ``convert_command`` and
    ``analyze_command`` there (or ``main.commands["convert"]``)."""
    import warnings

    old = {"list_passes": passes_command}
    if name in old:
        warnings.warn(f"hydracc.cli.{name} moved: use hydracc.cli.passes.passes_command", DeprecationWarning, stacklevel=2)
        return old[name]
    raise AttributeError(f"module 'hydracc.cli' has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
