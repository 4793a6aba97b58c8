"""``hydracc generate``: continue a prompt with a converted checkpoint and its hybrid cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hydracc.cli.common import (
    Reporter,
    allow_nonfinite_option,
    check_hashes_option,
    human_bytes,
    json_option,
    run_command,
)


@click.command("generate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 = greedy; otherwise sample at this temperature.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--device", default=None, help="Torch device to run on (default: cuda when available, else cpu).")
@allow_nonfinite_option()
@check_hashes_option()
@json_option("Print the continuation and the numbers as JSON on stdout.")
def generate_command(model_path: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
                     device: str | None, allow_nonfinite: bool, check_hashes: bool, as_json: bool) -> None:
    """Continue --prompt with the converted checkpoint MODEL, using the hybrid cache.

    Prints the continuation, then tokens per second and the cache size: keys and values are
    kept only for the KV heads full heads use; linear heads keep a fixed-size state.
    """
    reporter = Reporter(as_json, False)

    def work() -> dict[str, Any]:
        from hydracc.pipeline.options import check_device
        from hydracc.runtime.generate import generate_text

        check_device(device)
        report = generate_text(model_path, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               seed=seed, device=device, allow_nonfinite=allow_nonfinite, check_hashes=check_hashes)
        if not as_json:
            click.echo(prompt + report["continuation"])
        con = reporter.err if not as_json else reporter.console
        cache = report["cache"]
        con.print(f"{report['new_tokens']} tokens in {report['seconds']:.2f} s ({report['tokens_per_second']} tokens/s); "
                  f"cache after {cache['tokens']} tokens: {human_bytes(cache['bytes'])} ({human_bytes(cache['kv_bytes'])} of "
                  f"keys/values, {human_bytes(cache['bytes'] - cache['kv_bytes'])} of fixed-size state: linear heads, "
                  f"streaming windows) vs {human_bytes(cache['full_attention_kv_bytes'])} of keys/values with full attention "
                  "everywhere")
        return report

    run_command(reporter, work)
