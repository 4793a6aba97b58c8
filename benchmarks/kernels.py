"""hydracc's fused Triton kernels against SDPA, the naive composition and the ideal, one command.

Usage (GPU machine, from a checkout):  PYTHONPATH=. python benchmarks/kernels.py [--json FILE]
       (CPU, tiny shapes, Triton interpreter, no timing claims):  python benchmarks/kernels.py --smoke

A layer of 32 query heads, head dim 128, bf16, 25% full heads (heads 0-7, contiguous as the
converter permutes them) and 75% ``elu`` linear heads with scale-normalized fusion; MHA and a
GQA variant with 8 KV heads. q, k, v are transposed views of ``[B, T, H, D]`` projections, as
transformers passes them. Prefill at B x T = 1x4096, 1x16384, 1x65536, 8x4096; decode (one
token) at B = 16 over T = 8192 and 32768 cached tokens. Columns (ms, median of CUDA-event
timings after warmup; repeats capped by a time budget, so 1x65536 SDPA runs a few times only):
  - hydracc: ``triton_prefill.hybrid_prefill`` with its default (GPU) settings, i.e. the full
    heads by SDPA on a side stream while the Triton kernel runs the rest / decode:
    ``triton_decode.hybrid_decode_triton``; "one kernel": every head in the persistent Triton
    kernel (``full_heads="triton"``); "SDPA, then kernel": the two one after the other;
  - SDPA all: ``scaled_dot_product_attention`` on all heads (causal; ``enable_gqa`` for GQA);
  - naive: index_select the heads, SDPA on the full ones, the linear part on the rest (prefill:
    flash-linear-attention's ``chunk_linear_attn`` on elu features if ``fla`` imports, else a
    chunked torch form; decode: hydracc's torch ``linear_state_step``, i.e. today's cache
    path), fusion, scatter back;
  - linear: the naive linear part alone on all 32 heads (contiguous, KV heads pre-expanded);
  - ideal: 0.25 x SDPA all + 0.75 x linear.
Before timing, every kernel is checked against ``hybrid_attention_reference`` at a small shape
with every head kind, and at every timed shape against the naive composition (relative L2
error under 1e-2); the run fails, exit code 1, if one is wrong (``--keep-going`` times the
rest anyway). Rows are printed to stderr as they finish. Prints a Markdown table
(device, torch and triton versions, date) and writes the rows as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL_FRACTION = 0.25
FULL_SIZE_TOLERANCE = 1e-2  # relative L2 error of hydracc's bf16 output against the naive composition


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timed repeats per measurement")
    ap.add_argument("--only", choices=["prefill", "decode"], help="run one half")
    ap.add_argument(
        "--keep-going", action="store_true",
        help="on a failed check or measurement, report it and go on (exit code 1 at the end)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton compiles anything
    sys.path.insert(0, str(ROOT))
    import torch

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    import triton

    bench = Bench(device, args.budget, smoke, args.keep_going)
    t0 = time.monotonic()
    try:
        check_correctness(device, smoke)
    except Exception as err:  # noqa: BLE001 - a compile error fails the check as much as a wrong number
        print(f"CORRECTNESS CHECK FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        if not args.keep_going:
            return 1
        bench.failed = True
    print(f"correctness check done at {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = Rows(t0)
    layers = [("MHA", 32), ("GQA", 8)] if not smoke else [("MHA", 8), ("GQA", 2)]
    heads, dim = (32, 128) if not smoke else (8, 16)
    dtype = torch.bfloat16
    if args.only != "prefill":  # decode first: it needs no linear peer (fla autotunes per shape, slowly)
        shapes = [(16, 8192), (16, 32768)] if not smoke else [(2, 40)]
        for name, hkv in layers:
            for b, t in shapes:
                rows.append(decode_row(bench, name, b, t, heads, hkv, dim, dtype))
    if args.only != "decode":
        shapes = [(1, 4096), (1, 16384), (8, 4096), (1, 65536)] if not smoke else [(1, 33), (2, 17)]
        for name, hkv in layers:
            for b, t in shapes:
                rows.append(prefill_row(bench, name, b, t, heads, hkv, dim, dtype))
    header = {
        "device": torch.cuda.get_device_name(device) if not smoke else f"CPU ({platform.processor() or 'interpreter'})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": linear_impl_name(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": smoke,
    }
    print(render(header, rows, heads, dim))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    bad = [r for r in rows if any(k.startswith("rel_err") and (r[k] is None or not r[k] < FULL_SIZE_TOLERANCE) for k in r)]
    for r in bad:
        print(f"FULL-SIZE CHECK FAILED: {r['case']} {r['B']} x {r['T']}", file=sys.stderr)
    return 1 if bench.failed or bad else 0


# --- timing ---------------------------------------------------------------------------------


class Rows(list):
    """The rows so far; each is printed (stderr) as it is added, with the time since the start."""

    def __init__(self, t0: float) -> None:
        super().__init__()
        self.t0 = t0

    def append(self, row: dict) -> None:
        super().append(row)
        times = {k: round(v, 3) for k, v in row.items() if k.startswith("hydracc") and "vs" not in k}
        print(f"[{time.monotonic() - self.t0:.0f} s] {row['case']} {row['B']}x{row['T']}: hydracc {times}, "
              f"SDPA {row['sdpa_all']:.3f}, naive {row['naive']:.3f}, linear {row['linear']:.3f} ms, "
              f"errors {[round(v, 5) if v is not None else None for k, v in row.items() if 'err' in k]}",
              file=sys.stderr, flush=True)


class Bench:
    """Median CUDA-event time of a callable after warmup (a single wall-clock run when smoke).
    With ``keep_going`` a failing callable is reported and timed as NaN, and ``failed`` is set."""

    def __init__(self, device, budget: float, smoke: bool, keep_going: bool = False) -> None:
        self.device, self.budget, self.smoke, self.keep_going = device, budget, smoke, keep_going
        self.failed = False

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.keep_going:
            return self._time(fn)
        try:
            return self._time(fn)
        except Exception as err:  # noqa: BLE001 - reported, the run goes on
            print(f"MEASUREMENT FAILED: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
            self.failed = True
            return float("nan")

    def _time(self, fn: Callable[[], object]) -> float:
        import torch

        if self.smoke:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end), 1e-3)
        reps = int(min(50, max(3, self.budget * 1e3 / estimate)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in events)


# --- the layer and its implementations -------------------------------------------------------


def layer_kinds(heads: int) -> list[int]:
    from hydracc.kernels import ELU, FULL

    n_full = int(heads * FULL_FRACTION)
    return [FULL.code] * n_full + [ELU.code] * (heads - n_full)


def layer_params(heads: int, dim: int, device, seed: int = 0):
    import torch

    from hydracc.kernels import param_shapes

    g = torch.Generator().manual_seed(seed)
    shapes = param_shapes(heads, dim)
    params = []
    for name, shape in shapes.items():
        t = torch.rand(*shape, generator=g) + 0.5 if name == "fusion_scale" else torch.randn(*shape, generator=g) * 0.1
        params.append(t.to(device))
    return params


def projections(b: int, t: int, hq: int, hkv: int, d: int, dtype, device, seed: int = 0):
    """q, k, v as SDPA-layout views of [B, T, H, D] tensors (and the bases)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    qb = torch.randn(b, t, hq, d, generator=g, device=device, dtype=dtype)
    kb = torch.randn(b, t, hkv, d, generator=g, device=device, dtype=dtype)
    vb = torch.randn(b, t, hkv, d, generator=g, device=device, dtype=dtype)
    return qb, kb, vb


_FLA = None


def linear_impl_name() -> str:
    return "fla chunk_linear_attn" if _fla() is not None else "torch chunked (fla not importable)"


def _fla():
    global _FLA
    if _FLA is None:
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            _FLA = chunk_linear_attn
        except Exception:  # noqa: BLE001 - any import failure means "no peer"
            _FLA = False
    return _FLA or None


def elu_linear_bthd(q, k, v):
    """Normalized causal elu linear attention on [B, T, H, D] inputs (KV heads expanded);
    returns fp32 [B, T, H, Dv]. fla when available, else a chunked torch form."""
    import torch.nn.functional as F

    fq, fk = F.elu(q.float()) + 1.0, F.elu(k.float()) + 1.0
    fla = _fla()
    if fla is not None and q.is_cuda:
        extra = {"head_first": False} if "head_first" in inspect.signature(fla).parameters else {}
        out, _ = fla(fq.to(q.dtype), fk.to(k.dtype), v, scale=1.0, normalize=True, **extra)
        return out.float()
    return torch_linear_chunked(fq.transpose(1, 2), fk.transpose(1, 2), v.float().transpose(1, 2)).transpose(1, 2)


def torch_linear_chunked(fq, fk, v, chunk: int = 256, eps: float = 1e-6):
    """Normalized causal linear attention on features [B, H, T, F] in chunks (fp32)."""
    import torch.nn.functional as F

    b, h, t, f = fq.shape
    c = min(chunk, t)
    pad = (-t) % c
    if pad:
        fq, fk, v = (F.pad(x, (0, 0, 0, pad)) for x in (fq, fk, v))
    n = (t + pad) // c
    fq, fk, v = (x.reshape(b, h, n, c, x.shape[-1]) for x in (fq, fk, v))
    kv = fk.transpose(-1, -2) @ v
    state = kv.cumsum(dim=2) - kv  # sum over earlier chunks
    zk = fk.sum(dim=3)
    norm = zk.cumsum(dim=2) - zk
    intra = (fq @ fk.transpose(-1, -2)).tril()
    num = fq @ state + intra @ v
    den = (fq * norm[:, :, :, None, :]).sum(-1, keepdim=True) + intra.sum(-1, keepdim=True) + eps
    return (num / den).reshape(b, h, n * c, -1)[:, :, :t]


def head_indices(kinds, group: int, device):
    """Index tensors of the full heads, their KV heads and the linear heads (built once, outside
    the timed calls: a host-to-device copy per call would synchronize and flatter the kernels)."""
    import torch

    full = [h for h, c in enumerate(kinds) if c == 0]
    lin = [h for h, c in enumerate(kinds) if c != 0]
    fi = torch.tensor(full, device=device)
    fkv = torch.tensor(sorted({h // group for h in full}), device=device)
    return fi, fkv, torch.tensor(lin, device=device)


def naive_prefill(qb, kb, vb, kinds, scale, params, index):
    """index_select heads, SDPA on full heads, linear on the rest, fusion, scatter back."""
    import torch.nn.functional as F

    from hydracc.kernels import fuse_linear_output

    b, t, hq, d = qb.shape
    group = hq // kb.shape[2]
    fi, fkv, li = index
    out = qb.new_empty(b, hq, t, vb.shape[-1])
    qf = qb.index_select(2, fi).transpose(1, 2)
    kf, vf = kb.index_select(2, fkv).transpose(1, 2), vb.index_select(2, fkv).transpose(1, 2)
    res = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale, enable_gqa=kf.shape[1] < qf.shape[1])
    out.index_copy_(1, fi, res)
    lkv = li // group
    lo = elu_linear_bthd(qb.index_select(2, li), kb.index_select(2, lkv), vb.index_select(2, lkv))
    lo = fuse_linear_output(lo.transpose(1, 2), params[0].index_select(0, li))
    out.index_copy_(1, li, lo.to(out.dtype))
    return out


def prefill_row(bench: Bench, name: str, b: int, t: int, hq: int, hkv: int, d: int, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    from hydracc.kernels.triton_prefill import FULL_HEADS_MODES, default_config, hybrid_prefill

    device = bench.device
    kinds = layer_kinds(hq)
    params = layer_params(hq, d, device)
    scale = d**-0.5
    qb, kb, vb = projections(b, t, hq, hkv, d, dtype, device)
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
    row = {"case": f"prefill {name}", "B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": d}
    index = head_indices(kinds, hq // hkv, device)
    naive = partial(naive_prefill, qb, kb, vb, kinds, scale, params, index)
    base = default_config(d, d, dtype)
    for mode in FULL_HEADS_MODES:  # one kernel; SDPA for the full heads then the kernel; both at once (default)
        run = partial(hybrid_prefill, q, k, v, kinds, scale, params, config=dataclasses.replace(base, full_heads=mode))
        row[f"max_err_{mode}"], row[f"rel_err_{mode}"] = full_size_error(bench, run, naive)
        row[f"hydracc_{mode}"] = bench(run)
    row["default"] = base.full_heads  # which of the three the "hydracc" column shows
    sdpa = partial(F.scaled_dot_product_attention, is_causal=True, scale=scale, enable_gqa=hkv < hq)
    row["sdpa_all"] = bench(partial(sdpa, q, k, v))
    row["naive"] = bench(partial(naive_prefill, qb, kb, vb, kinds, scale, params, index))
    ke, ve = kb.repeat_interleave(hq // hkv, dim=2), vb.repeat_interleave(hq // hkv, dim=2)
    row["linear"] = bench(partial(elu_linear_bthd, qb, ke, ve))
    del ke, ve, qb, kb, vb, q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return finish(row)


def decode_inputs(b: int, t: int, hq: int, hkv: int, d: int, dtype, device, kinds):
    """One decode step's q, new k/v (strided views) and a hybrid cache of t tokens (random)."""
    import torch

    from hydracc.kernels.decode_op import decode_layout

    lay = decode_layout(tuple(kinds), hq, hkv)
    g = torch.Generator(device=device).manual_seed(1)
    qb, kb, vb = projections(b, 1, hq, hkv, d, dtype, device, seed=1)
    keys = torch.randn(b, len(lay.cached_kv), t, d, generator=g, device=device, dtype=dtype)
    values = torch.randn(b, len(lay.cached_kv), t, d, generator=g, device=device, dtype=dtype)
    states = []
    for _, heads in lay.linear:
        states.append(torch.rand(b, len(heads), d, d, generator=g, device=device) * t)
        states.append(torch.rand(b, len(heads), d, generator=g, device=device) * t)
    return qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), keys, values, states


def naive_decode(q, k_new, v_new, keys, values, states, kinds, scale, params, group, index):
    """Today's ``HybridStep.attend`` path for one token: SDPA on full heads, torch linear step."""
    import torch.nn.functional as F

    from hydracc.kernels import ELU, fuse_linear_output, linear_state_step

    out = q.new_empty(q.shape[0], q.shape[1], 1, v_new.shape[-1])
    fi, _, li = index
    res = F.scaled_dot_product_attention(q.index_select(1, fi), keys, values, scale=scale, enable_gqa=keys.shape[1] < fi.numel())
    out.index_copy_(1, fi, res)
    rows = {"fusion_scale": params[0].index_select(0, li)}
    lo, (s, z) = linear_state_step(ELU.code, q.index_select(1, li), k_new.index_select(1, li // group),
                                   v_new.index_select(1, li // group), (states[0], states[1]), rows)
    states[0].copy_(s)
    states[1].copy_(z)
    out.index_copy_(1, li, fuse_linear_output(lo, rows["fusion_scale"]).to(out.dtype))
    return out


def decode_row(bench: Bench, name: str, b: int, t: int, hq: int, hkv: int, d: int, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    from hydracc.kernels import ELU, linear_state_step
    from hydracc.kernels.triton_decode import hybrid_decode_triton

    device = bench.device
    kinds = layer_kinds(hq)
    params = layer_params(hq, d, device)
    scale = d**-0.5
    q, k_new, v_new, keys, values, states = decode_inputs(b, t, hq, hkv, d, dtype, device, kinds)
    row = {"case": f"decode {name}", "B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": d}
    group = hq // hkv
    index = head_indices(kinds, group, device)
    fresh = [s.clone() for s in states], [s.clone() for s in states]  # both sides step from the same state
    row["max_err"], row["rel_err"] = full_size_error(
        bench,
        partial(hybrid_decode_triton, q, k_new, v_new, keys, values, fresh[0], None, None, None, kinds, scale, params),
        partial(naive_decode, q, k_new, v_new, keys, values, fresh[1], kinds, scale, params, group, index),
    )
    del fresh
    row["hydracc"] = bench(
        partial(hybrid_decode_triton, q, k_new, v_new, keys, values, states, None, None, None, kinds, scale, params)
    )
    del keys, values
    if device.type == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator(device=device).manual_seed(2)
    k_all = torch.randn(b, hkv, t, d, generator=g, device=device, dtype=dtype)
    v_all = torch.randn(b, hkv, t, d, generator=g, device=device, dtype=dtype)
    row["sdpa_all"] = bench(partial(F.scaled_dot_product_attention, q, k_all, v_all, scale=scale, enable_gqa=hkv < hq))
    del k_all, v_all
    n_full = int(hq * FULL_FRACTION)
    n_cached = len({h // group for h in range(n_full)})
    keys = torch.randn(b, n_cached, t, d, generator=g, device=device, dtype=dtype)
    values = torch.randn(b, n_cached, t, d, generator=g, device=device, dtype=dtype)
    row["naive"] = bench(partial(naive_decode, q, k_new, v_new, keys, values, states, kinds, scale, params, group, index))
    del keys, values
    s_all = torch.rand(b, hq, d, d, generator=g, device=device)
    z_all = torch.rand(b, hq, d, generator=g, device=device)
    ke, ve = k_new.repeat_interleave(group, dim=1), v_new.repeat_interleave(group, dim=1)
    row["linear"] = bench(partial(linear_state_step, ELU.code, q, ke, ve, (s_all, z_all)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return finish(row)


def full_size_error(bench: Bench, ours: Callable[[], object], naive: Callable[[], object]) -> tuple[float | None, float | None]:
    """Max abs and relative L2 difference of hydracc's output from the naive composition's at the
    timed shape ((None, None) if either fails or has NaN): races and indexing bugs can hide at the
    small checked shape. The check passes on the relative error (bf16 outputs of a few units
    differ by whole bf16 steps, 1/16 at 8-16, so a max-abs bound says little at long lengths)."""
    try:
        a, b = ours(), naive()
        diff = a.float() - b.float()
        err, rel = diff.abs().max().item(), (diff.norm() / b.float().norm()).item()
    except Exception as exc:  # noqa: BLE001 - reported; the row's check fails
        if not bench.keep_going:
            raise
        print(f"FULL-SIZE CHECK ERROR: {type(exc).__name__}: {str(exc)[:2000]}", file=sys.stderr)
        return None, None
    return (err, rel) if rel == rel and err == err else (None, None)  # NaN anywhere: failed


def finish(row: dict) -> dict:
    """The ideal, and hydracc's default (prefill: full heads by SDPA beside the kernel) against it."""
    row["ideal"] = FULL_FRACTION * row["sdpa_all"] + (1 - FULL_FRACTION) * row["linear"]
    ours = row[f"hydracc_{row['default']}"] if "default" in row else row["hydracc"]
    row["hydracc_vs_ideal"] = ours / row["ideal"]
    row["hydracc_vs_naive"] = ours / row["naive"]
    return row


# --- correctness --------------------------------------------------------------------------


def check_correctness(device, smoke: bool) -> None:
    """Every kind through both kernels at a small shape against the reference (AssertionError)."""
    import torch

    from hydracc.kernels import hybrid_attention_reference, linear_state_step
    from hydracc.kernels.decode_op import decode_layout
    from hydracc.kernels.triton_decode import hybrid_decode_triton
    from hydracc.kernels.triton_prefill import hybrid_prefill

    d, hq, hkv, t0 = (16, 8, 2, 21) if smoke else (128, 16, 4, 300)
    kinds = [0, 1, 2, 3, 4, 1, 2, 0] * (hq // 8)
    windows = [w for c in kinds for w in ((3, 17) if c == 4 else (0, 0))]  # every streaming head: sink 3, window 17
    params = layer_params(hq, d, device, seed=3)
    g = torch.Generator(device=device).manual_seed(3)
    steps = 2
    # fp32 only under the interpreter: on CUDA the op sends bf16/fp16 layers to the Triton prefill
    # (fp32 ones stay on SDPA), and compiling the fp32 variants costs minutes of GPU time
    dtypes = ((torch.float32, 2e-5), (torch.bfloat16, 6e-2)) if smoke else ((torch.bfloat16, 6e-2),)
    for dtype, tol in dtypes:
        t = t0 + steps
        qb = torch.randn(2, t, hq, d, generator=g, device=device).to(dtype)
        kb = torch.randn(2, t, hkv, d, generator=g, device=device).to(dtype)
        vb = torch.randn(2, t, hkv, d, generator=g, device=device).to(dtype)
        q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
        want = hybrid_attention_reference(q, k, v, kinds, 0.1, params, windows).float()
        out = torch.full((2, t0, hq, d), float("nan"), device=device, dtype=dtype).transpose(1, 2)
        got = hybrid_prefill(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], kinds, 0.1, params, windows, out=out).float()
        err = (got - want[:, :, :t0]).abs().max().item()
        assert not got.isnan().any() and err < tol, f"prefill {dtype}: max error {err:.3g} (tolerance {tol})"
        lay = decode_layout(tuple(kinds), hq, hkv)
        group = lay.group
        keys, values = k[:, list(lay.cached_kv), :t0], v[:, list(lay.cached_kv), :t0]
        states = []
        for code, heads in lay.linear:
            idx = torch.tensor(heads, device=device)
            rows = {n: p.index_select(0, idx) for n, p in zip(("fusion_scale", "hedgehog_weight", "hedgehog_bias", "gdn_gate_weight", "gdn_gate_bias"), params)}
            _, st = linear_state_step(code, q[:, heads, :t0], k[:, idx // group, :t0], v[:, idx // group, :t0], None, rows)
            states += [s.contiguous() for s in st]
        pos = torch.arange(t0, device=device)
        sk = list(lay.stream_kv)
        for p in range(t0, t):
            keys = torch.cat([keys, k[:, list(lay.cached_kv), p : p + 1]], dim=2)
            values = torch.cat([values, v[:, list(lay.cached_kv), p : p + 1]], dim=2)
            pos = torch.cat([pos, torch.tensor([p], device=device)])
            wk, wv = k[:, sk, : p + 1], v[:, sk, : p + 1]  # the whole window cache, untrimmed
            got = hybrid_decode_triton(
                q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], keys, values, states, wk, wv, pos,
                kinds, 0.1, params, windows,
            ).float()
            err = (got - want[:, :, p : p + 1]).abs().max().item()
            assert not got.isnan().any() and err < tol, f"decode {dtype} step {p}: max error {err:.3g} (tolerance {tol})"
    # the naive composition (and the linear peer's calling convention) on the benchmark's kinds
    kinds = layer_kinds(hq)
    qb, kb, vb = projections(1, t0, hq, hkv, d, torch.bfloat16, device, seed=4)
    want = hybrid_attention_reference(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2), kinds, 0.1, params).float()
    index = head_indices(kinds, hq // hkv, device)
    err = (naive_prefill(qb, kb, vb, kinds, 0.1, params, index).float() - want).abs().max().item()
    assert err < 6e-2, f"naive composition ({linear_impl_name()}): max error {err:.3g}"


# --- report -----------------------------------------------------------------------------------


def render(header: dict, rows: list[dict], heads: int, dim: int) -> str:
    lines = [
        f"# hydracc kernels: {header['device']}",
        "",
        f"torch {header['torch']}, triton {header['triton']}, linear peer: {header['fla']}, {header['date']}.",
        f"{heads} query heads, head dim {dim}, bf16, {int(FULL_FRACTION * 100)}% full heads, the rest elu + fusion. ms, median.",
    ]
    if header["smoke"]:
        lines.append("SMOKE RUN (CPU, Triton interpreter, tiny shapes): the times below mean nothing.")
    lines += [
        "",
        "| case | B x T | Hkv | hydracc | one kernel | SDPA, then kernel | SDPA all | naive | linear | ideal "
        "| hydracc / ideal | hydracc / naive | rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(r: dict, key: str) -> str:
        return f"{r[key]:.3f}" if key in r else "-"

    def err(r: dict) -> str:
        errs = [r[k] for k in r if k.startswith("rel_err")]
        return "FAILED" if any(e is None for e in errs) else format(max(errs), ".1e")

    for r in rows:
        ours = r[f"hydracc_{r['default']}"] if "default" in r else r["hydracc"]
        lines.append(
            f"| {r['case']} | {r['B']} x {r['T']} | {r['Hkv']} | {ours:.3f} | {ms(r, 'hydracc_triton')} | "
            f"{ms(r, 'hydracc_sdpa')} | {r['sdpa_all']:.3f} | {r['naive']:.3f} | {r['linear']:.3f} | "
            f"{r['ideal']:.3f} | {ours / r['ideal']:.2f} | {ours / r['naive']:.2f} | {err(r)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
