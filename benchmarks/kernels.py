"""hydracc's fused Triton kernels against SDPA, the naive composition and the ideal, one command.

Usage (GPU machine, from a checkout):  PYTHONPATH=. python benchmarks/kernels.py [--json FILE]
       (CPU, tiny shapes, Triton interpreter, no timing claims):  python benchmarks/kernels.py --smoke

A layer of 32 query heads, head dim 128, bf16, 25% full heads (heads 0-7, contiguous as the
converter permutes them) and 75% ``elu`` linear heads with scale-normalized fusion; MHA and a
GQA variant with 8 KV heads. q, k, v are transposed views of ``[B, T, H, D]`` projections, as
transformers passes them. Prefill at B x T = 1x4096, 1x16384, 1x65536, 8x4096; decode (one
token) at B = 16 over T = 8192 and 32768 cached tokens. Columns (ms, median of CUDA-event
timings after warmup; repeats capped by a time budget, so 1x65536 SDPA runs a few times only):
  - hydracc: ``triton_prefill.hybrid_prefill`` / ``triton_decode.hybrid_decode_triton``;
  - SDPA all: ``scaled_dot_product_attention`` on all heads (causal; ``enable_gqa`` for GQA);
  - naive: index_select the heads, SDPA on the full ones, the linear part on the rest (prefill:
    flash-linear-attention's ``chunk_linear_attn`` on elu features if ``fla`` imports, else a
    chunked torch form; decode: hydracc's torch ``linear_state_step``, i.e. today's cache
    path), fusion, scatter back;
  - linear: the naive linear part alone on all 32 heads (contiguous, KV heads pre-expanded);
  - ideal: 0.25 x SDPA all + 0.75 x linear.
Before timing, every kernel is checked against ``hybrid_attention_reference`` at a small shape
with every head kind (the run fails, exit code 1, if one is wrong). Prints a Markdown table
(device, torch and triton versions, date) and writes the rows as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
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


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timed repeats per measurement")
    ap.add_argument("--only", choices=["prefill", "decode"], help="run one half")
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

    bench = Bench(device, args.budget, smoke)
    try:
        check_correctness(device, smoke)
    except AssertionError as err:
        print(f"CORRECTNESS CHECK FAILED: {err}", file=sys.stderr)
        return 1
    rows = []
    layers = [("MHA", 32), ("GQA", 8)] if not smoke else [("MHA", 8), ("GQA", 2)]
    heads, dim = (32, 128) if not smoke else (8, 16)
    dtype = torch.bfloat16
    if args.only != "decode":
        shapes = [(1, 4096), (1, 16384), (1, 65536), (8, 4096)] if not smoke else [(1, 33), (2, 17)]
        for name, hkv in layers:
            for b, t in shapes:
                rows.append(prefill_row(bench, name, b, t, heads, hkv, dim, dtype))
    if args.only != "prefill":
        shapes = [(16, 8192), (16, 32768)] if not smoke else [(2, 40)]
        for name, hkv in layers:
            for b, t in shapes:
                rows.append(decode_row(bench, name, b, t, heads, hkv, dim, dtype))
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
    return 0


# --- timing ---------------------------------------------------------------------------------


class Bench:
    """Median CUDA-event time of a callable after warmup (a single wall-clock run when smoke)."""

    def __init__(self, device, budget: float, smoke: bool) -> None:
        self.device, self.budget, self.smoke = device, budget, smoke

    def __call__(self, fn: Callable[[], object]) -> float:
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

    from hydracc.kernels.triton_prefill import hybrid_prefill

    device = bench.device
    kinds = layer_kinds(hq)
    params = layer_params(hq, d, device)
    scale = d**-0.5
    qb, kb, vb = projections(b, t, hq, hkv, d, dtype, device)
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2)
    row = {"case": f"prefill {name}", "B": b, "T": t, "Hq": hq, "Hkv": hkv, "D": d}
    row["hydracc"] = bench(partial(hybrid_prefill, q, k, v, kinds, scale, params))
    sdpa = partial(F.scaled_dot_product_attention, is_causal=True, scale=scale, enable_gqa=hkv < hq)
    row["sdpa_all"] = bench(partial(sdpa, q, k, v))
    index = head_indices(kinds, hq // hkv, device)
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
    group = hq // hkv
    n_full = int(hq * FULL_FRACTION)
    n_cached = len({h // group for h in range(n_full)})
    keys = torch.randn(b, n_cached, t, d, generator=g, device=device, dtype=dtype)
    values = torch.randn(b, n_cached, t, d, generator=g, device=device, dtype=dtype)
    index = head_indices(kinds, group, device)
    row["naive"] = bench(partial(naive_decode, q, k_new, v_new, keys, values, states, kinds, scale, params, group, index))
    del keys, values
    s_all = torch.rand(b, hq, d, d, generator=g, device=device)
    z_all = torch.rand(b, hq, d, generator=g, device=device)
    ke, ve = k_new.repeat_interleave(group, dim=1), v_new.repeat_interleave(group, dim=1)
    row["linear"] = bench(partial(linear_state_step, ELU.code, q, ke, ve, (s_all, z_all)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return finish(row)


def finish(row: dict) -> dict:
    row["ideal"] = FULL_FRACTION * row["sdpa_all"] + (1 - FULL_FRACTION) * row["linear"]
    row["hydracc_vs_ideal"] = row["hydracc"] / row["ideal"]
    row["hydracc_vs_naive"] = row["hydracc"] / row["naive"]
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
    for dtype, tol in ((torch.float32, 2e-3 if not smoke else 2e-5), (torch.bfloat16, 6e-2)):
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
        "| case | B x T | Hkv | hydracc | SDPA all | naive | linear | ideal | hydracc / ideal | hydracc / naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['B']} x {r['T']} | {r['Hkv']} | {r['hydracc']:.3f} | {r['sdpa_all']:.3f} | "
            f"{r['naive']:.3f} | {r['linear']:.3f} | {r['ideal']:.3f} | {r['hydracc_vs_ideal']:.2f} | "
            f"{r['hydracc_vs_naive']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
