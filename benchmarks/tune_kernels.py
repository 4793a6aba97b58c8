"""Sweep the fused kernels' launch settings on a GPU, and time each part of the prefill alone.

Usage (GPU machine, from a checkout):  PYTHONPATH=. python benchmarks/tune_kernels.py [--json FILE] [--deadline S]
       (CPU, tiny shapes, Triton interpreter, no timing claims):  python benchmarks/tune_kernels.py --smoke

The layer is ``kernels.py``'s (32 query heads, head dim 128, bf16, 25% full + 75% elu with
fusion). Each variant is checked against the default's output before it is timed (a
setting that breaks the kernel shows as FAILED, not as a fast time; the error column is the
relative L2 difference from the default's output). Prefill variants: the
default (full heads by SDPA beside the kernel), then the one kernel with one thing changed at a
time: host-only settings first (programs per SM, the linear items' cost weight: no recompile),
then compiled ones (pipelining depth, tiles, value block, warps). "parts" runs the one kernel
on an all-full and an all-elu layer, next to SDPA on all heads and the linear peer on all
heads: where the fused kernel loses time.
Decode variants: key ranges of the flash-decoding split, keys per block, warps.
Variants stop being started once ``--deadline`` seconds have passed (compiles are slow);
the rows done so far are still printed and written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timed repeats per measurement")
    ap.add_argument("--deadline", type=float, default=240.0, help="start no new variant after this many seconds")
    return ap.parse_args(argv)


def prefill_variants(default) -> list[tuple[str, object]]:
    """(name, PrefillConfig): the default, then the one kernel (``full_heads="triton"``, which the
    default uses where the full heads cannot go to SDPA) with one change at a time, host-only
    ones first."""
    r = partial(dataclasses.replace, default, full_heads="triton")
    return [
        ("default", default),
        ("one kernel", r()),
        ("one kernel, programs/SM 1", r(programs_per_sm=1)),
        ("one kernel, programs/SM 4", r(programs_per_sm=4)),
        ("one kernel, linear cost 1", r(linear_cost=1.0)),
        ("one kernel, linear cost 4", r(linear_cost=4.0)),
        ("one kernel, stages 3", r(num_stages=3)),
        ("one kernel, block_n 128", r(block_n=128)),
        ("one kernel, elu block_dv 64", r(elu_block_dv=64)),
        ("one kernel, block_m 64", r(block_m=64)),
        ("one kernel, warps 4", r(num_warps=4)),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import kernels as kb
    import torch

    from hydracc.kernels import ELU, FULL
    from hydracc.kernels.triton_decode import hybrid_decode_triton
    from hydracc.kernels.triton_prefill import default_config, hybrid_prefill

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    bench = kb.Bench(device, args.budget, smoke, keep_going=True)
    start = time.monotonic()
    heads, dim, dtype = (32, 128, torch.bfloat16) if not smoke else (8, 16, torch.bfloat16)
    rows: list[dict] = []

    def late() -> bool:
        return time.monotonic() - start > args.deadline

    def emit(row: dict) -> None:
        rows.append(row)
        err = "-" if "rel_err" not in row else "FAILED" if row["rel_err"] is None else f"{row['rel_err']:.1e}"
        print(f"{row['case']:<9} {row['shape']:<16} {row['variant']:<30} {row['ms']:9.3f} ms  err {err}", flush=True)

    # --- prefill ---------------------------------------------------------------------------
    prefill_shapes = [("MHA", 32, 1, 16384), ("MHA", 32, 8, 4096), ("GQA", 8, 1, 4096)] if not smoke else [("MHA", 8, 1, 40)]
    default = default_config(dim, dim, dtype)
    for name, hkv, b, t in prefill_shapes:
        shape = f"{name} {b}x{t}"
        kinds = kb.layer_kinds(heads)
        params = kb.layer_params(heads, dim, device)
        scale = dim**-0.5
        qb, kk, vb = kb.projections(b, t, heads, hkv, dim, dtype, device)
        q, k, v = qb.transpose(1, 2), kk.transpose(1, 2), vb.transpose(1, 2)
        want = hybrid_prefill(q, k, v, kinds, scale, params, config=default).float()
        for variant, cfg in prefill_variants(default):
            if late():
                break
            run = partial(hybrid_prefill, q, k, v, kinds, scale, params, config=cfg)
            _, err = kb.full_size_error(bench, run, lambda want=want: want)
            emit({"case": "prefill", "shape": shape, "variant": variant, "ms": bench(run), "rel_err": err,
                  "config": dataclasses.asdict(cfg)})
        if not late():  # the parts: all-full and all-elu layers through the same kernel, and their peers
            for label, part_kinds in (("full", [FULL.code] * heads), ("elu", [ELU.code] * heads)):
                one_kernel = dataclasses.replace(default, full_heads="triton")  # the kernel's own tiles, not SDPA
                emit({"case": "prefill", "shape": shape, "variant": f"one kernel, all {label}",
                      "ms": bench(partial(hybrid_prefill, q, k, v, part_kinds, scale, params, config=one_kernel))})
            sdpa = partial(torch.nn.functional.scaled_dot_product_attention, is_causal=True, scale=scale, enable_gqa=hkv < heads)
            emit({"case": "prefill", "shape": shape, "variant": "SDPA all", "ms": bench(partial(sdpa, q, k, v))})
            ke, ve = kk.repeat_interleave(heads // hkv, dim=2), vb.repeat_interleave(heads // hkv, dim=2)
            emit({"case": "prefill", "shape": shape, "variant": "linear peer all", "ms": bench(partial(kb.elu_linear_bthd, qb, ke, ve))})
            del ke, ve
        del qb, kk, vb, q, k, v, want
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # --- decode ----------------------------------------------------------------------------
    decode_shapes = [("MHA", 32, 16, 32768), ("GQA", 8, 16, 32768)] if not smoke else [("MHA", 8, 2, 300)]
    decode_variants = [
        ("default", {}), ("nsplit 1", {"nsplit": 1}), ("nsplit 2", {"nsplit": 2}), ("nsplit 8", {"nsplit": 8}),
        ("nsplit 16", {"nsplit": 16}), ("block_n 32", {"block_n": 32}), ("block_n 128", {"block_n": 128}),
        ("warps 8", {"num_warps": 8}), ("warps 2", {"num_warps": 2}),
    ]
    for name, hkv, b, t in decode_shapes:
        if late():
            break
        shape = f"{name} {b}x{t}"
        kinds = kb.layer_kinds(heads)
        params = kb.layer_params(heads, dim, device)
        scale = dim**-0.5
        q, k_new, v_new, keys, values, states = kb.decode_inputs(b, t, heads, hkv, dim, dtype, device, kinds)
        base = [s.clone() for s in states]
        want = hybrid_decode_triton(q, k_new, v_new, keys, values, [s.clone() for s in base], None, None, None,
                                    kinds, scale, params).float()
        for variant, opts in decode_variants:
            if late():
                break
            run = partial(hybrid_decode_triton, q, k_new, v_new, keys, values, states, None, None, None,
                          kinds, scale, params, **opts)
            check = partial(hybrid_decode_triton, q, k_new, v_new, keys, values, [s.clone() for s in base], None, None,
                            None, kinds, scale, params, **opts)
            _, err = kb.full_size_error(bench, check, lambda want=want: want)
            emit({"case": "decode", "shape": shape, "variant": variant, "ms": bench(run), "rel_err": err, "options": opts})
        del q, k_new, v_new, keys, values, states, base
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{len(rows)} rows in {time.monotonic() - start:.0f} s"
          + (" (deadline reached: later variants skipped)" if late() else ""))
    if args.json:
        header = {"device": torch.cuda.get_device_name(device) if not smoke else "CPU (interpreter)",
                  "torch": torch.__version__, "smoke": smoke}
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    bad = [r for r in rows if r.get("rel_err", 0) is None or r.get("rel_err", 0) > kb.FULL_SIZE_TOLERANCE or r["ms"] != r["ms"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
