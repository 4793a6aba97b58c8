"""Generation with the hybrid cache: cache bytes and decode speed against the original model.

Usage: python benchmarks/generate.py [--model examples/tiny-llama] [--kv-budget 0.25] [--new-tokens 64]
                                     [--lengths 256,1024,8000] [--reps 7] [--threads 2]

Converts the model at ``--kv-budget`` (scored plan), then for several context lengths prefills
a prompt of held-out text and greedily decodes ``--new-tokens`` tokens, once with the original
model (SDPA, transformers' ``DynamicCache``, as its ``generate`` uses) and once converted
(``HybridCache`` preallocated for the prompt and the new tokens, as ``generate`` builds it).
The two alternate ``--reps`` times; the table has the median tokens/s of each and the median of
the per-repetition ratios (the machine's speed drifts between repetitions, less within one).
Reports the cache bytes after generation and decode tokens per second (prefill excluded).
Prints a Markdown table. On the CPU the hybrid step is plain torch (SDPA for full heads, the
kinds' one-token steps for the others).
"""

from __future__ import annotations

import argparse
import platform
import statistics
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
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--lengths", default="256,1024,8000")
    ap.add_argument("--reps", type=int, default=7, help="alternating runs of each model per length")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    import hydracc
    from hydracc.convert import convert
    from hydracc.evaluation.tasks import stdlib_corpus
    from hydracc.runtime.cache import HybridCache

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="hydracc-generate-")
    work = Path(tmp.name)
    result = convert(args.model, work / "converted", kv_budget=args.kv_budget)
    original = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa").eval()
    converted = hydracc.load(work / "converted")
    text = stdlib_corpus().heldout
    print(f"model: {args.model.name}, converted at --kv-budget {args.kv_budget} "
          f"(KV cache {result.cost.ratio:.0%} of the original per token); {args.new_tokens} new tokens, greedy, batch 1")
    print(f"machine: {platform.machine()}, {args.threads} threads, median of {args.reps} alternating runs; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print()
    print("| context | original cache | hybrid cache (KV + linear state) | ratio | original tokens/s | hybrid tokens/s | speed ratio |")
    print("|---|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        prompt = torch.from_numpy(text[: length - args.new_tokens].copy())[None]
        speeds: dict[str, list[float]] = {"original": [], "hybrid": []}
        for _ in range(args.reps):
            dense = DynamicCache(config=original.config)
            hybrid = HybridCache(converted.config, max_cache_len=length)
            speed_o, _ = timed_generate(original, prompt, dense, args.new_tokens)
            speed_h, _ = timed_generate(converted, prompt, hybrid, args.new_tokens)
            speeds["original"].append(speed_o)
            speeds["hybrid"].append(speed_h)
        dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
        ratio = statistics.median(h / o for o, h in zip(speeds["original"], speeds["hybrid"], strict=True))
        print(f"| {length} | {dense_bytes / 1024:.0f} KiB | {hybrid.nbytes() / 1024:.0f} KiB "
              f"({hybrid.kv_nbytes() / 1024:.0f} + {(hybrid.nbytes() - hybrid.kv_nbytes()) / 1024:.0f}) | "
              f"{hybrid.nbytes() / dense_bytes:.2f} | {statistics.median(speeds['original']):.0f} | "
              f"{statistics.median(speeds['hybrid']):.0f} | {ratio:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
