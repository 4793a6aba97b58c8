"""``hydracc passes``: list the registered graph passes."""

from __future__ import annotations

import click

from hydracc.cli.common import Reporter, run_guarded


@click.command("passes")
@click.option("--plugin", "plugins", multiple=True, metavar="FILE.py|MODULE", help="Load a file or module that registers passes first.")
def passes_command(plugins: tuple[str, ...]) -> None:
    """List the registered graph passes (built-in and from --plugin)."""
    reporter = Reporter(False, False)

    def work() -> None:
        from hydracc.passes import registered_passes
        from hydracc.pipeline.stages import load_plugins

        load_plugins(plugins)
        for p in registered_passes():
            click.echo(f"{p.name:16} {p.description}")

    run_guarded(reporter, work)
