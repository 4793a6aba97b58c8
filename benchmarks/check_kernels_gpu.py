"""The fused prefill kernel against the fp32 reference on a GPU: every kind, realistic lengths.

Usage (GPU machine, from a checkout):  PYTHONPATH=. python benchmarks/check_kernels_gpu.py [--deadline S]

The CPU tests run the kernels under the Triton interpreter, which runs programs one at a time,
computes bf16 dots in fp32 (so bf16 inputs take the fp32 path there) and returns zeros for any
masked load. This script checks what only a GPU shows: the bf16 tensor-core path, real
concurrency, the GPU block shapes and the persistent work plan at the GPU's size. Inputs are
bf16 (and fp16) random q/k/v as views of ``[B, T, H, D]`` projections (GQA: 8 query heads, 2 KV
heads); the reference is ``hybrid_attention_reference`` in fp32 on the same rounded inputs.
Each case prints the relative L2 error, the worst head and the worst 64-token block of
positions (the default sends full heads that are whole KV groups to SDPA, so the kernel's own
softmax tiles are checked as the ``full heads triton`` variant); a case over ``--tolerance`` is then re-run with single settings changed (warps,
tiles, one program per item) to show which one the error follows. Last, the final linear states a
prefill writes for decode (``states=``) against the recurrent reference. Exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KIND_SETS = {
    "full": [0] * 8,
    "elu": [1] * 8,
    "hedgehog": [2] * 8,
    "streaming": [4] * 8,
    "full+elu": [0, 0, 0, 0, 1, 1, 1, 1],
    "all kinds": [0, 1, 2, 3, 4, 1, 2, 0],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=float, default=150.0, help="start no new case after this many seconds")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="largest relative L2 error")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script under the Triton interpreter")
    args = ap.parse_args(argv)
    if args.tokens < 64:
        ap.error("--tokens must be at least 64 (errors are reported per 64-token block)")
    if args.device == "cpu":
        import os

        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from kernels import layer_params  # benchmarks/kernels.py: the benchmark layer's parameters

    from hydracc.kernels import hybrid_attention_reference
    from hydracc.kernels.triton_prefill import default_config, hybrid_prefill

    if args.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    start = time.monotonic()
    failures: list[tuple] = []

    def run_case(d: int, name: str, dtype, cfg, label: str, b: int = 2, t: int = args.tokens) -> float:
        kinds = KIND_SETS[name]
        hq, hkv = len(kinds), 2
        g = torch.Generator(device=dev).manual_seed(d * 7 + len(name))
        qb = torch.randn(b, t, hq, d, generator=g, device=dev).to(dtype)
        kb = torch.randn(b, t, hkv, d, generator=g, device=dev).to(dtype)
        vb = torch.randn(b, t, hkv, d, generator=g, device=dev).to(dtype)
        q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
        params = layer_params(hq, d, dev, seed=5)
        windows = [w for c in kinds for w in ((4, 100) if c == 4 else (0, 0))]
        want = hybrid_attention_reference(q.float(), k.float(), v.float(), kinds, d**-0.5, params, windows)
        out = torch.full((b, t, hq, d), float("nan"), device=dev, dtype=dtype).transpose(1, 2)
        got = hybrid_prefill(q, k, v, kinds, d**-0.5, params, windows, out=out, config=cfg).float()
        diff = got - want
        err = (diff.norm() / want.norm()).item() if not got.isnan().any() else float("nan")
        per_head = (diff.pow(2).sum(dim=(0, 2, 3)) / want.pow(2).sum(dim=(0, 2, 3))).sqrt()
        blocks = diff.pow(2).sum(dim=(0, 1, 3))
        blocks = blocks[: t // 64 * 64].reshape(-1, 64).sum(1) / want.pow(2).sum(dim=(0, 1, 3))[: t // 64 * 64].reshape(-1, 64).sum(1)
        worst_blk = int(blocks.argmax())
        flag = "ok" if err < args.tolerance else "FAIL"
        print(f"{flag:4} D={d:<3} {name:<10} {str(dtype)[6:]:<8} {label:<18} rel {err:.2e}  worst head {int(per_head.argmax())} "
              f"({per_head.max().item():.1e})  worst positions {worst_blk * 64}-{worst_blk * 64 + 63} "
              f"({blocks.max().sqrt().item():.1e}), first 64: {blocks[0].sqrt().item():.1e}, nan {int(got.isnan().sum())}",
              flush=True)
        return err

    for d in (16, 64, 128):
        base = default_config(d, d, torch.bfloat16)
        for name in KIND_SETS:
            if time.monotonic() - start > args.deadline:
                break
            err = run_case(d, name, torch.bfloat16, base, "default")
            if not err < args.tolerance:
                failures.append((d, name))
            if name in ("full", "full+elu"):  # full heads 0-3 = KV head 0: the default sends them to SDPA
                for mode in ("triton", "sdpa"):  # so check the kernel's own softmax tiles too
                    err = run_case(d, name, torch.bfloat16, dataclasses.replace(base, full_heads=mode), f"full heads {mode}")
                    if not err < args.tolerance:
                        failures.append((d, f"{name} {mode}"))
    if time.monotonic() - start < args.deadline:
        err = run_case(128, "all kinds", torch.float16, default_config(128, 128, torch.float16), "default fp16")
        if not err < args.tolerance:
            failures.append((128, "all kinds fp16"))
    for d in (16, 128):  # the starting states a prefill hands decode (generate's first chunk)
        if time.monotonic() - start < args.deadline:
            err = check_states(d, dev)
            print(f"{'ok' if err < args.tolerance else 'FAIL':4} D={d:<3} all kinds  states   rel {err:.2e}", flush=True)
            if not err < args.tolerance:
                failures.append((d, "states"))
    for d, name in failures:
        if name not in KIND_SETS:
            continue
        base = default_config(d, d, torch.bfloat16)
        for label, cfg in (
            ("warps 4", dataclasses.replace(base, num_warps=4)),
            ("one program", dataclasses.replace(base, num_programs=1)),
            ("block_m 64", dataclasses.replace(base, block_m=64)),
            ("block_n 32", dataclasses.replace(base, block_n=32)),
            ("block_t 32", dataclasses.replace(base, block_t=32, hedgehog_block_t=16)),
            ("stages 1", dataclasses.replace(base, num_stages=1)),
        ):
            if time.monotonic() - start > args.deadline:
                break
            run_case(d, name, torch.bfloat16, cfg, label)
        if time.monotonic() - start < args.deadline:
            run_case(d, name, torch.float16, default_config(d, d, torch.float16), "fp16")
            run_case(d, name, torch.float32, default_config(d, d, torch.float32), "fp32")
    print(f"{len(failures)} failing cases in {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failures else 0


def check_states(d: int, dev, t: int = 700) -> float:
    """Worst relative error of ``hybrid_prefill(..., states=)``'s final linear states (bf16 inputs)
    against ``linear_state_step`` over the same tokens in fp32."""
    import torch
    from kernels import layer_params

    from hydracc.kernels import PARAM_NAMES, linear_state_step
    from hydracc.kernels.decode_op import decode_layout
    from hydracc.kernels.triton_prefill import hybrid_prefill

    kinds = KIND_SETS["all kinds"]
    hq, hkv = len(kinds), 2
    g = torch.Generator(device=dev).manual_seed(11)
    q = torch.randn(2, t, hq, d, generator=g, device=dev).bfloat16().transpose(1, 2)
    k = torch.randn(2, t, hkv, d, generator=g, device=dev).bfloat16().transpose(1, 2)
    v = torch.randn(2, t, hkv, d, generator=g, device=dev).bfloat16().transpose(1, 2)
    params = layer_params(hq, d, dev, seed=5)
    windows = [w for c in kinds for w in ((4, 100) if c == 4 else (0, 0))]
    lay = decode_layout(tuple(kinds), hq, hkv)
    states, want = [], []
    for code, heads in lay.linear:
        idx = torch.tensor(heads, device=dev)
        rows = {n: p.index_select(0, idx) for n, p in zip(PARAM_NAMES, params)}
        _, ref = linear_state_step(code, q[:, heads].float(), k[:, idx // (hq // hkv)].float(),
                                   v[:, idx // (hq // hkv)].float(), None, rows)
        want += list(ref)
        states += [torch.full_like(x, float("nan")) for x in ref]
    hybrid_prefill(q, k, v, kinds, d**-0.5, params, windows, states=states)
    return max(((a - b).norm() / b.norm()).item() if not a.isnan().any() else float("inf") for a, b in zip(states, want))


if __name__ == "__main__":
    sys.exit(main())
