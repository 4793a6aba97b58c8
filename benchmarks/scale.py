"""Real-size shapes: plan, convert and distill cost on random checkpoints with the exact shapes of
Qwen3-0.6B, Qwen3-1.7B and Llama-3-8B (built from configs; cost, not quality).

    python benchmarks/scale.py build qwen3-0.6b /tmp/q06            # random bf16 weights, 500 MB shards
    python benchmarks/scale.py run /tmp/q06 --stages forward,plan    # wall time and peak RSS per stage
    python benchmarks/scale.py run /tmp/q06 --device cuda --stages plan,convert,distill

``plan`` is ``convert --plan`` with the default analysis, and writes the plan to ``--out``'s
``plan.json``; ``convert`` converts by that plan file (emit only: run ``plan`` first), and
``distill`` is a whole ``convert --distill`` (its own plan in the default distilled kind, gdn, then
recording, 100 attention-transfer steps per layer and emit). Each stage runs in its own process (``/usr/bin/time``-style peak RSS from ``resource``), so one
stage's memory never hides another's. ``forward`` is the reference the issue holds the plan
against: one plain transformers forward pass in float32 over the same calibration rows
(``--calib-samples`` x ``--seq-len``, default 16 x 256). On CUDA, peak device memory is reported too.
Prints a markdown table and, with ``--json``, the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "qwen3-0.6b": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 40960, "rope_theta": 1000000,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
    },
    "qwen3-1.7b": {
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 40960, "rope_theta": 1000000,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
    },
    "qwen3-tiny": {  # not a real model: dry runs of the benchmarks on a CPU
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
        "vocab_size": 1024, "tie_word_embeddings": True, "max_position_embeddings": 4096, "rope_theta": 1000000,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
    },
    "llama-3-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    },
}


def build(shape: str, out: Path, shard_bytes: int = 500 * 2**20, seed: int = 0) -> None:
    """Write config.json and random bf16 safetensors shards (std 0.02, norms 1), one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=False)
    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.save_pretrained(out)
    names = [n for n, _ in model.named_parameters(remove_duplicate=True)]
    params = dict(model.named_parameters(remove_duplicate=True))
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    index: dict[str, str] = {}
    files: list[str] = []

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shards[-1], str(out / name), metadata={"format": "pt"})
            files.append(name)
            for key in shards[-1]:
                index[key] = name
            shards.append({})
            size = 0

    for name in names:
        p = params[name]
        if name.endswith("norm.weight") or "layernorm" in name:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if size + nbytes > shard_bytes and shards[-1]:
            flush()
        shards[-1][name] = t
        size += nbytes
    flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    print(f"{shape}: {len(names)} tensors, {total / 2**30:.2f} GiB in {len(files)} shards at {out}")


CHILD = r"""
import json, resource, sys, time
import torch
stage, path, samples, seq_len, device, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:]
t0 = time.perf_counter()
info = {}
if stage == "forward":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval().to(device)
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, samples, 8):
            model(ids[i : i + 8].to(device), logits_to_keep=1)
    info["load_s"] = round(load, 1)
else:
    from hydracc.convert import convert
    import pathlib
    kwargs = dict(calib_samples=samples, seq_len=seq_len, device=device)
    work = pathlib.Path(extra[0])
    work.mkdir(parents=True, exist_ok=True)
    plan = work / "plan.json"
    if stage == "plan":
        result = convert(path, dry_run=True, plan_out=plan, force=True, **kwargs)
        info["analysis"] = (result.analysis.extra or {}).get("sensitivity")
    elif stage == "convert":
        result = convert(path, work / "converted", force=True, plan_file=plan, **kwargs)
    elif stage == "distill":
        result = convert(path, work / "distilled", force=True, distill=True, steps=100, e2e_steps=0,
                         distill_samples=samples, **kwargs)
        info["held_out"] = result.learned.held_out if result.learned else None
if device.startswith("cuda"):
    torch.cuda.synchronize()
    info["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
info["seconds"] = round(time.perf_counter() - t0, 1)
info["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
print("RESULT " + json.dumps(info))
"""


def run_stage(stage: str, path: Path, samples: int, seq_len: int, device: str, out: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, stage, str(path), str(samples), str(seq_len), device, str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"stage": stage, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": round(wall, 1)}
    return {"stage": stage, "wall_s": round(wall, 1), **json.loads(line.removeprefix("RESULT "))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random checkpoint with a real model's shape")
    b.add_argument("shape", choices=sorted(SHAPES))
    b.add_argument("out", type=Path)
    r = sub.add_parser("run", help="time the stages on a checkpoint")
    r.add_argument("path", type=Path)
    r.add_argument("--stages", default="forward,plan")
    r.add_argument("--device", default="cpu")
    r.add_argument("--calib-samples", type=int, default=16)
    r.add_argument("--seq-len", type=int, default=256)
    r.add_argument("--out", type=Path, default=Path("/tmp/hydracc-scale-out"))
    r.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.shape, args.out)
        return
    import torch

    rows = [run_stage(s, args.path, args.calib_samples, args.seq_len, args.device, args.out) for s in args.stages.split(",")]
    print(f"# {args.path.name}: {args.calib_samples} x {args.seq_len} calibration tokens on {args.device}; torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| stage | wall s | stage s | peak RSS GiB | peak GPU GiB | note |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        extra = row.get("analysis") or row.get("held_out")
        note = row.get("error") or (json.dumps(extra) if extra else "")
        print(f"| {row['stage']} | {row['wall_s']} | {row.get('seconds', '-')} | {row.get('peak_rss_gib', '-')} | "
              f"{row.get('peak_gpu_gib', '-')} | {note} |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
