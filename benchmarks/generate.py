"""Generation with the hybrid cache: cache bytes and decode speed against the original model.

Usage: python benchmarks/generate.py [--model examples/tiny-llama] [--kv-budget 0.25] [--new-tokens 32]

Converts the model at ``--kv-budget`` (scored plan), then for several context lengths prefills
a prompt of held-out text and greedily decodes ``--new-tokens`` tokens, once with the original
model (SDPA, transformers' ``DynamicCache``) and once with the converted one (``HybridCache``).
Reports the cache bytes after generation and decode tokens per second (prefill excluded).
Prints a Markdown table. CPU timings are for orientation only: the hybrid step is plain torch
(index_select + SDPA for full heads, a torch linear-attention step), not a fused kernel.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def timed_generate(model, ids: torch.Tensor, cache, new_tokens: int) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)  # prefill (not timed)
        nxt = out.logits[:, -1:].argmax(-1)
        tokens = [nxt]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            tokens.append(nxt)
        seconds = time.perf_counter() - start
    return (new_tokens - 1) / seconds, torch.cat(tokens, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "tiny-llama")
    ap.add_argument("--kv-budget", type=float, default=0.25)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--lengths", default="256,1024,2000")
    args = ap.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    import hydracc
    from hydracc.convert import convert
    from hydracc.evaluation.tasks import stdlib_corpus
    from hydracc.runtime.cache import HybridCache

    torch.set_num_threads(2)
    tmp = tempfile.TemporaryDirectory(prefix="hydracc-generate-")
    work = Path(tmp.name)
    result = convert(args.model, work / "converted", kv_budget=args.kv_budget)
    original = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
    converted = hydracc.load(work / "converted")
    text = stdlib_corpus().heldout
    print(f"model: {args.model.name}, converted at --kv-budget {args.kv_budget} "
          f"(KV cache {result.cost.ratio:.0%} of the original per token); {args.new_tokens} new tokens, greedy, batch 1")
    print(f"machine: {platform.machine()}, 2 threads; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print()
    print("| context | original cache | hybrid cache (KV + linear state) | ratio | original tokens/s | hybrid tokens/s |")
    print("|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        prompt = torch.from_numpy(text[: length - args.new_tokens].copy())[None]
        dense = DynamicCache(config=original.config)
        hybrid = HybridCache(converted.config)
        speed_o, _ = timed_generate(original, prompt, dense, args.new_tokens)
        speed_h, _ = timed_generate(converted, prompt, hybrid, args.new_tokens)
        dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
        print(f"| {length} | {dense_bytes / 1024:.0f} KiB | {hybrid.nbytes() / 1024:.0f} KiB "
              f"({hybrid.kv_nbytes() / 1024:.0f} + {(hybrid.nbytes() - hybrid.kv_nbytes()) / 1024:.0f}) | "
              f"{hybrid.nbytes() / dense_bytes:.2f} | {speed_o:.0f} | {speed_h:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
