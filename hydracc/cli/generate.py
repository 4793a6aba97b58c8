"""``hydracc generate``: continue a prompt with a converted checkpoint and its hybrid cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hydracc.cli.common import Reporter, human_bytes, json_option, run_command
from hydracc.errors import HydraError


@click.command("generate")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(0.0), default=0.0, show_default=True, help="0 = greedy; otherwise sample at this temperature.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--device", default=None, help="Torch device to run on (default: cuda when available, else cpu).")
@json_option("Print the continuation and the numbers as JSON on stdout.")
def generate_command(model_path: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
                     device: str | None, as_json: bool) -> None:
    """Continue --prompt with the converted checkpoint MODEL, using the hybrid cache.

    Prints the continuation, then tokens per second and the cache size: keys and values are
    kept only for the KV heads full heads use; linear heads keep a fixed-size state.
    """
    reporter = Reporter(as_json, False)

    def work() -> dict[str, Any]:
        import time
        import warnings

        import torch
        from transformers import AutoTokenizer

        from hydracc.device import default_device
        from hydracc.frontend.checkpoint import read_config
        from hydracc.pipeline.options import check_device
        from hydracc.runtime.cache import HybridCache
        from hydracc.runtime.loader import check_converted, load

        check_device(device)
        root, _ = check_converted(model_path)  # the path and files first: a clear error, not transformers'
        if not (root / "tokenizer.json").is_file() and not (root / "tokenizer_config.json").is_file():
            raise HydraError(f"{root} has no tokenizer files", hint="copy the original model's tokenizer.json next to the converted weights")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices are not the user's business
            tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] == 0:
            raise HydraError("--prompt is empty after tokenization")
        config = read_config(root)
        limit = config.get("max_position_embeddings") or config.get("n_positions")
        if isinstance(limit, int) and ids.shape[1] + max_new_tokens > limit:
            raise HydraError(f"--prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that is more than "
                             f"the model's {limit} positions", hint="shorten the prompt or ask for fewer new tokens")
        dev = default_device(device)
        model = load(root, device=dev)
        ids = ids.to(dev)
        cache = HybridCache(model.config, max_cache_len=ids.shape[1] + max_new_tokens - 1)  # (what generate would size)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or None} if temperature > 0 else {"do_sample": False}
        start = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            out = model.generate(ids, max_new_tokens=max_new_tokens, past_key_values=cache, pad_token_id=None, **sampling)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        element = next(p.element_size() for p in model.parameters())
        tokens = cache.get_seq_length()
        sites = config["hydra"]["layers"]  # validated by load(); per layer KV heads and head dim
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
                  f"{human_bytes(cache.nbytes())} ({human_bytes(cache.kv_nbytes())} of keys/values, "
                  f"{human_bytes(cache.nbytes() - cache.kv_nbytes())} of fixed-size state: linear heads, streaming windows) "
                  f"vs {human_bytes(full_kv)} of keys/values with full attention everywhere")
        return report

    run_command(reporter, work)
