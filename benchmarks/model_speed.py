"""Whole models on one GPU: prefill time, decode tokens/s and memory, original against converted.

    python benchmarks/model_speed.py [--shape qwen3-1.7b] [--kinds elu,gdn] [--batches 1,16]
        [--contexts 4096,32768] [--decode-steps 32] [--work DIR] [--json OUT]
    python benchmarks/model_speed.py --device cpu --shape qwen3-tiny --contexts 128 --batches 1,2   (dry run)

Builds a random checkpoint with the exact shape (``scale.py``'s shapes, config only), converts it
at ``--kv-budget`` (25%) once per kind with ``--strategy even`` (every layer keeps the same share
of its KV groups: speed depends on how many heads stay full, not on which), and measures each
model in this one process, at every batch and context:
- prefill: the whole prompt in one forward pass (logits for the last position only); when it
  does not fit in memory, the cache is filled in chunks instead and prefill is reported as OOM;
- decode: ``--decode-steps`` greedy one-token steps after the prompt (after 3 warm-up steps);
- peak device memory of the two, and the cache's bytes.
The original runs in transformers' fastest configuration: SDPA, a ``StaticCache`` for the whole
length, and (on CUDA) the decode step compiled with ``torch.compile(mode="reduce-overhead")``
(CUDA graphs; compile time reported apart). The converted model runs as hydracc serves it:
``hydracc.load`` and a ``HybridCache`` preallocated for the length (what ``generate`` builds).
Beside each figure, the physical limit on this device: decode moves at least the weights, the
cache read and the linear states read and written per step (at the measured copy bandwidth);
prefill runs at least 2 x parameters x tokens plus the full heads' attention FLOPs (at the
measured bf16 matmul rate). The largest batch that fits at the longest context follows from the
cache bytes per sequence and the device memory left after the weights and the B=1 workspace.
Prints a markdown table; ``--json`` writes the rows and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse(argv: list[str] | None) -> argparse.Namespace:
    from scale import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    ap.add_argument("--kinds", default="elu,gdn", help="linear kinds to convert to, comma-separated")
    ap.add_argument("--kv-budget", type=float, default=0.25)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="compile the original's decode step (auto: on CUDA)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/hydracc-model-speed"),
                    help="where the checkpoints go (reused when already there)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds: measurements not started by then are skipped (reported as such)")
    return ap.parse_args(argv)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    import torch

    n = (1 << 29) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 2 * 10 / (time.perf_counter() - start)


def matmul_rate(device) -> float:
    """FLOP/s of a large bf16 (CPU: fp32) matmul."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - start)


def checkpoints(args: argparse.Namespace) -> dict[str, Path]:
    """The original and one converted checkpoint per kind (built or converted once, then reused)."""
    from scale import build

    from hydracc.convert import convert

    original = args.work / args.shape
    if not (original / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        build(args.shape, original)
        print(f"built {original} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    paths = {"original": original}
    for kind in args.kinds.split(","):
        out = args.work / f"{args.shape}-{kind}-{args.kv_budget:g}"
        if not (out / "config.json").exists():
            t0 = time.perf_counter()
            convert(original, out, kv_budget=args.kv_budget, strategy="even", linear_kind=kind, force=True)
            print(f"converted ({kind}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        paths[kind] = out
    return paths


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes that grow with the tokens, fixed bytes) held by a StaticCache or a HybridCache."""
    from hydracc.runtime.cache import HybridCache

    if isinstance(cache, HybridCache):
        return cache.kv_nbytes(), cache.nbytes() - cache.kv_nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None), 0


def decode_bytes(weights: int, cache, b: int, t: int, length: int) -> float:
    """Bytes one decode step must move: every weight, the cache's rows up to ``t``, the fixed
    states read and written. (A StaticCache's and a preallocated HybridCache's bytes cover
    ``length`` rows; the step reads the first ``t``.)"""
    grow, fixed = cache_bytes(cache)
    return weights + grow * t / length + 2 * fixed


def prefill_flops(config, params: int, full_heads: int, b: int, t: int) -> float:
    """2 x (parameters outside the embeddings) x tokens + causal attention of the full heads
    (``full_heads`` summed over layers) + the LM head at the last position."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    embed = config.vocab_size * config.hidden_size
    return 2 * (params - embed) * b * t + 2 * b * t * t * d * full_heads + 2 * embed * b


def full_head_count(config, kind: str) -> int:
    """Query heads that stay softmax attention, summed over layers."""
    if kind == "original":
        return config.num_attention_heads * config.num_hidden_layers
    return sum(sum(1 for kind in layer["kinds"] if kind == "full") for layer in config.hydra["layers"])


def measure(name: str, model, b: int, t: int, args: argparse.Namespace, device, step, weights: int) -> dict:
    import torch
    from transformers import StaticCache

    from hydracc.runtime.cache import HybridCache

    length = t + args.decode_steps + 4
    cfg = model.config
    row: dict = {"model": name, "B": b, "T": t}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def new_cache():
        if name == "original":
            return StaticCache(config=cfg, max_cache_len=length)
        return HybridCache(cfg, max_cache_len=length)

    gen = torch.Generator(device="cpu").manual_seed(b * 100003 + t)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen).to(device)
    cache = new_cache()
    with torch.no_grad():
        try:
            sync(device)
            start = time.perf_counter()
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            sync(device)
            row["prefill_ms"] = (time.perf_counter() - start) * 1e3
        except torch.OutOfMemoryError:
            row["prefill_ms"] = None
            row["note"] = "prefill in one pass: out of memory (cache filled in chunks)"
            out = cache = None
            torch.cuda.empty_cache()
            cache = new_cache()
            chunk = max(1, 65536 // b)
            for a in range(0, t, chunk):
                out = model(ids[:, a : a + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        del out

        def one(pos: int):
            position = torch.tensor([pos], device=device)
            return step(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=position,
                        position_ids=position[None].expand(b, 1), logits_to_keep=1).logits

        pos = t
        warm = time.perf_counter()
        try:
            one(pos)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - a compiled step that fails is reported, and run eagerly
            if step is model.forward:
                raise
            row["note"] = f"compiled decode step failed ({type(err).__name__}: {str(err)[:120]}); eager"
            step = model.forward
        pos += 1
        for _ in range(2):
            one(pos)
            pos += 1
        sync(device)
        row["warmup_s"] = time.perf_counter() - warm
        start = time.perf_counter()
        for _ in range(args.decode_steps):
            one(pos)
            pos += 1
        sync(device)
    seconds = time.perf_counter() - start
    row["decode_ms_per_step"] = seconds / args.decode_steps * 1e3
    row["decode_tok_s"] = b * args.decode_steps / seconds
    grow, fixed = cache_bytes(cache)
    row["cache_gib"] = (grow + fixed) / 2**30
    row["cache_per_seq_gib"] = (grow + fixed) / b / 2**30
    row["_bytes_step"] = decode_bytes(weights, cache, b, t, length)
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began = time.monotonic()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import hydracc

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a dry run", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_step = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    args.work.mkdir(parents=True, exist_ok=True)
    paths = checkpoints(args)
    bandwidth, flops = copy_bandwidth(device), matmul_rate(device)
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "shape": args.shape,
        "kv_budget": args.kv_budget, "copy_gb_s": bandwidth / 1e9, "matmul_tflop_s": flops / 1e12,
        "decode_steps": args.decode_steps, "original_decode": "compiled (reduce-overhead)" if compile_step else "eager",
    }
    print(json.dumps(header), file=sys.stderr, flush=True)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    rows: list[dict] = []
    for name, path in paths.items():
        if args.deadline is not None and time.monotonic() - began > args.deadline:
            rows += [{"model": name, "B": b, "T": t, "error": "skipped: past --deadline"} for b in batches for t in contexts]
            continue
        t0 = time.perf_counter()
        if name == "original":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        else:
            model = hydracc.load(path, dtype=dtype, device=device)
        print(f"[{name}] loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        params = sum(p.numel() for p in model.parameters())
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        step = model.forward
        if name == "original" and compile_step:
            step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        heads = full_head_count(model.config, name)
        for b in batches:
            for t in contexts:
                if args.deadline is not None and time.monotonic() - began > args.deadline:
                    rows.append({"model": name, "B": b, "T": t, "error": "skipped: past --deadline"})
                    continue
                try:
                    row = measure(name, model, b, t, args, device, step, weights)
                except Exception as err:  # noqa: BLE001 - reported, the run goes on
                    row = {"model": name, "B": b, "T": t, "error": f"{type(err).__name__}: {str(err)[:300]}"}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                else:
                    row["prefill_limit_ms"] = prefill_flops(model.config, params, heads, b, t) / flops * 1e3
                    row["decode_limit_tok_s"] = b / (row.pop("_bytes_step") / bandwidth)
                rows.append(row)
                print(f"[{name}] {json.dumps(row)}", file=sys.stderr, flush=True)
        del model, step
        if name == "original" and compile_step:
            torch._dynamo.reset()  # (frees the CUDA graphs' memory pools before the next model)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    largest = largest_batches(rows, device, contexts[-1])
    print(render(header, rows, largest))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows, "largest_batch": largest}, indent=1) + "\n")
    return 1 if any("error" in r for r in rows) else 0


def largest_batches(rows: list[dict], device, context: int) -> dict[str, int | None]:
    """Per model: the largest batch whose cache fits at ``context`` beside the weights and the
    B=1 run's other memory (its peak minus its cache), from the measured bytes."""
    import torch

    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    out: dict[str, int | None] = {}
    for r in rows:
        if r["T"] == context and r["B"] == 1 and "peak_gib" in r:
            per_seq = r["cache_per_seq_gib"]
            out[r["model"]] = max(0, math.floor((total - (r["peak_gib"] - r["cache_gib"])) / per_seq))
    return out


def render(header: dict, rows: list[dict], largest: dict) -> str:
    def f(x, spec: str) -> str:
        return "OOM" if x is None else format(x, spec)

    lines = [
        f"{header['shape']} at {header['kv_budget']:.0%} of the KV cache; {header['device']}, torch {header['torch']}, "
        f"transformers {header['transformers']}, {header['date']}; copy {header['copy_gb_s']:.0f} GB/s, "
        f"matmul {header['matmul_tflop_s']:.2f} TFLOP/s; original decode {header['original_decode']}",
        "",
        "| model | B | context | prefill ms | prefill limit ms | decode tok/s | decode limit tok/s | cache GiB | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['B']} | {r['T']} | error: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['B']} | {r['T']} | {f(r['prefill_ms'], '.1f')} | {r['prefill_limit_ms']:.1f} | "
            f"{r['decode_tok_s']:.0f} | {r['decode_limit_tok_s']:.0f} | {r['cache_gib']:.2f} | "
            f"{f(r.get('peak_gib'), '.1f') if 'peak_gib' in r else '-'} |"
        )
    if largest:
        lines += ["", "Largest batch at the longest context: "
                  + ", ".join(f"{name} {b}" for name, b in largest.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
