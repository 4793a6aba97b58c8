"""Tests for the head-kind table and the plain-torch reference attention functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hydracc.kernels import (
    ELU,
    FULL,
    GDN,
    HEDGEHOG,
    KIND_NAMES,
    PARAM_NAMES,
    STREAMING,
    causal_linear_attention,
    causal_linear_attention_recurrent,
    causal_softmax_attention,
    causal_streaming_attention,
    gated_delta_rule_recurrent,
    hedgehog_attention_recurrent,
    hybrid_attention_reference,
    kind_by_code,
    kind_by_name,
    run_kind,
)
from kernel_ops.kernel_cases import FIVE_KINDS, WINDOWS, make_params
from kernel_ops.kernel_cases import qkv as fresh_qkv

ATOL = RTOL = 1e-5


def rand(
    *shape: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def qkv(
    b: int, hq: int, hkv: int, tq: int, tk: int, d: int = 16, dv: int | None = None
):
    return (
        rand(b, hq, tq, d, seed=1),
        rand(b, hkv, tk, d, seed=2),
        rand(b, hkv, tk, dv or d, seed=3),
    )


def expand(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1)


# --- head kinds -------------------------------------------------------------------


def test_head_kind_table():
    assert KIND_NAMES[:2] == ("full", "elu")
    assert kind_by_name("full") is FULL and kind_by_code(0) is FULL
    assert kind_by_name("elu") is ELU and kind_by_code(1) is ELU
    assert not FULL.linear and FULL.keeps_kv and ELU.linear and not ELU.keeps_kv
    with pytest.raises(KeyError, match="full, elu, hedgehog, gdn, streaming"):
        kind_by_name("softmax")
    with pytest.raises(KeyError, match="0 \\(full\\)"):
        kind_by_code(99)


# --- per-kind references ----------------------------------------------------------


@pytest.mark.parametrize("t", [1, 7, 33], ids=["T1", "T7", "T33"])
@pytest.mark.parametrize("dv", [16, 8], ids=["dv=d", "dv<d"])
def test_linear_recurrent_matches_parallel(t: int, dv: int):
    q, k, v = qkv(2, 3, 3, t, t, d=16, dv=dv)
    par = causal_linear_attention(q, k, v)
    rec = causal_linear_attention_recurrent(q, k, v)
    assert par.shape == (2, 3, t, dv)
    torch.testing.assert_close(par, rec, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("tq", [1, 5, 33], ids=["decode", "chunk", "all"])
def test_linear_bottom_right_alignment(tq: int):
    q, k, v = qkv(2, 2, 2, 33, 33)
    full = causal_linear_attention(q, k, v)
    tail_q = q[:, :, -tq:]
    torch.testing.assert_close(causal_linear_attention(tail_q, k, v), full[:, :, -tq:])
    torch.testing.assert_close(
        causal_linear_attention_recurrent(tail_q, k, v),
        full[:, :, -tq:],
        atol=ATOL,
        rtol=RTOL,
    )


@pytest.mark.parametrize("t", [1, 7, 33], ids=["T1", "T7", "T33"])
def test_softmax_matches_sdpa(t: int):
    q, k, v = qkv(2, 3, 3, t, t)
    scale = 0.37
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    torch.testing.assert_close(
        causal_softmax_attention(q, k, v, scale), ref, atol=ATOL, rtol=RTOL
    )


@pytest.mark.parametrize("tq", [1, 5], ids=["decode", "chunk"])
def test_softmax_bottom_right_alignment(tq: int):
    q, k, v = qkv(2, 2, 2, 20, 20)
    full = causal_softmax_attention(q, k, v, 0.25)
    out = causal_softmax_attention(q[:, :, -tq:], k, v, 0.25)
    torch.testing.assert_close(out, full[:, :, -tq:], atol=ATOL, rtol=RTOL)


def test_per_kind_rejects_more_queries_than_keys():
    q, k, v = qkv(1, 2, 2, 5, 4)
    with pytest.raises(ValueError, match="more queries than keys"):
        causal_softmax_attention(q, k, v, 1.0)
    with pytest.raises(ValueError, match="more queries than keys"):
        causal_linear_attention(q, k, v)


# --- hybrid reference -------------------------------------------------------------

GQA_CASES = [(4, 4), (8, 2), (8, 1)]
GQA_IDS = ["mha", "gqa", "mqa"]


@pytest.mark.parametrize(("hq", "hkv"), GQA_CASES, ids=GQA_IDS)
def test_hybrid_all_full_matches_sdpa(hq: int, hkv: int):
    q, k, v = qkv(2, hq, hkv, 9, 9)
    out = hybrid_attention_reference(q, k, v, [FULL.code] * hq, 0.3)
    ref = F.scaled_dot_product_attention(
        q, expand(k, hq), expand(v, hq), is_causal=True, scale=0.3
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("hq", "hkv"), GQA_CASES, ids=GQA_IDS)
def test_hybrid_all_linear_matches_linear(hq: int, hkv: int):
    q, k, v = qkv(2, hq, hkv, 6, 11)
    out = hybrid_attention_reference(q, k, v, [ELU.code] * hq, 0.3)
    ref = causal_linear_attention(q, expand(k, hq), expand(v, hq))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def _per_head(q, k, v, kinds, scale, params=(), windows=()):
    """Compose the hybrid one query head at a time (the slow, obvious way: recurrent forms)."""
    hq, group = q.shape[1], q.shape[1] // k.shape[1]
    outs = []
    for h in range(hq):
        qh, kh, vh = (
            q[:, h : h + 1],
            k[:, h // group][:, None],
            v[:, h // group][:, None],
        )
        p = {name: t[h : h + 1] for name, t in zip(PARAM_NAMES, params, strict=False)}
        if kinds[h] == FULL.code:
            out = causal_softmax_attention(qh, kh, vh, scale)
        elif kinds[h] == ELU.code:
            out = causal_linear_attention_recurrent(qh, kh, vh)
        elif kinds[h] == HEDGEHOG.code:
            out = hedgehog_attention_recurrent(qh, kh, vh, p["hedgehog_weight"], p["hedgehog_bias"])
        elif kinds[h] == GDN.code:
            out = gated_delta_rule_recurrent(qh, kh, vh, p["gdn_gate_weight"], p["gdn_gate_bias"])[0]
        else:
            assert kinds[h] == STREAMING.code
            out = causal_streaming_attention(qh, kh, vh, scale, windows[2 * h], windows[2 * h + 1])
        if params and kind_by_code(kinds[h]).linear:
            out = out * p["fusion_scale"] / (out.square().mean(-1, keepdim=True) + 1e-6).sqrt()
        outs.append(out)
    return torch.cat(outs, dim=1)


MIXED = [0, 1, 1, 1, 1, 0, 1, 1]


@pytest.mark.parametrize(("hq", "hkv"), [(8, 8), (8, 2), (8, 1)], ids=GQA_IDS)
@pytest.mark.parametrize("tq", [1, 7], ids=["decode", "prefill"])
def test_hybrid_mixed_matches_per_head(hq: int, hkv: int, tq: int):
    q, k, v = qkv(2, hq, hkv, tq, 7)
    out = hybrid_attention_reference(q, k, v, MIXED, 0.25)
    torch.testing.assert_close(
        out, _per_head(q, k, v, MIXED, 0.25), atol=ATOL, rtol=RTOL
    )


@pytest.mark.parametrize(("hq", "hkv"), [(8, 8), (8, 2), (8, 1)], ids=GQA_IDS)
@pytest.mark.parametrize(("tq", "tk"), [(1, 1), (1, 9), (7, 7), (5, 70), (70, 70)], ids=str)
def test_hybrid_five_kinds_matches_per_head(hq: int, hkv: int, tq: int, tk: int):
    q, k, v = fresh_qkv(2, hq, hkv, tq, tk, seed=tq + tk + hkv)
    params = make_params(hq, 16, seed=tk)
    out = hybrid_attention_reference(q, k, v, FIVE_KINDS, 0.25, params, WINDOWS)
    want = _per_head(q, k, v, FIVE_KINDS, 0.25, params, WINDOWS)
    # Fusion divides each linear head's output by its RMS, which is small at some positions
    # (gdn reads a few normalized keys), so fp32 rounding differences of ~1e-6 between the
    # chunked and the recurrent gdn grow to ~3e-5 there: atol 1e-4 for fused heads.
    fused = [h for h, c in enumerate(FIVE_KINDS) if kind_by_code(c).linear]
    plain = [h for h, c in enumerate(FIVE_KINDS) if not kind_by_code(c).linear]
    torch.testing.assert_close(out[:, fused], want[:, fused], atol=1e-4, rtol=RTOL)
    torch.testing.assert_close(out[:, plain], want[:, plain], atol=ATOL, rtol=RTOL)


def test_hybrid_fusion_sets_rms_of_linear_heads_only():
    q, k, v = fresh_qkv(2, 8, 2, 9, 9, seed=3)
    params = make_params(8, 16, seed=3)
    fused = hybrid_attention_reference(q, k, v, FIVE_KINDS, 0.25, params, WINDOWS)
    rms = fused.square().mean(-1).sqrt()  # [B, H, T]
    for h, code in enumerate(FIVE_KINDS):
        if kind_by_code(code).linear:
            rows = {name: t[h : h + 1] for name, t in zip(PARAM_NAMES, params, strict=True)}
            raw = run_kind(code, q[:, h : h + 1], k[:, h // 4, None], v[:, h // 4, None], 0.25, rows)
            mean_sq = raw.square().mean(-1)[:, 0]
            scale = params[0][h]
            # RMS == fusion_scale, up to the 1e-6 inside the square root
            torch.testing.assert_close(rms[:, h], scale * (mean_sq / (mean_sq + 1e-6)).sqrt(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rms[:, h], scale.expand(2, 9), atol=0, rtol=0.02)
    # full and streaming heads are untouched; elu without params is unfused
    plain = hybrid_attention_reference(q, k, v, [0, 1, 1, 1, 4, 1, 1, 4], 0.25, (), WINDOWS)
    for h in (0, 4, 7):
        torch.testing.assert_close(fused[:, h], plain[:, h], atol=0, rtol=0)
    assert (fused[:, 1] - plain[:, 1]).abs().max() > 1e-2


def test_hybrid_param_rows_are_by_query_head():
    """Swapping two learned heads' kinds and parameter rows swaps their outputs."""
    q, k, v = fresh_qkv(1, 4, 4, 8, 8, seed=4)
    params = make_params(4, 16, seed=4)
    out = hybrid_attention_reference(q, k, v, [2, 3, 2, 3], 0.3, params)
    perm = [2, 3, 0, 1]
    swapped = hybrid_attention_reference(q[:, perm], k[:, perm], v[:, perm], [2, 3, 2, 3], 0.3,
                                         [t[perm] for t in params])
    torch.testing.assert_close(swapped, out[:, perm], atol=0, rtol=0)
    shifted = hybrid_attention_reference(q, k, v, [2, 3, 2, 3], 0.3, [t[[1, 0, 3, 2]] for t in params])
    assert (shifted - out).abs().max() > 1e-3


def test_hybrid_non_contiguous_inputs():
    b, t, hq, hkv, d = 2, 9, 8, 2, 16
    # [B, T, H, D] storage viewed as [B, H, T, D], the way attention modules hand it over
    q = rand(b, t, hq, d, seed=1).transpose(1, 2)
    k = rand(b, t, hkv, d, seed=2).transpose(1, 2)
    v = rand(b, t, hkv, d, seed=3).transpose(1, 2)
    assert not q.is_contiguous()
    out = hybrid_attention_reference(q, k, v, MIXED, 0.25)
    ref = hybrid_attention_reference(
        q.contiguous(), k.contiguous(), v.contiguous(), MIXED, 0.25
    )
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert out.shape == (b, hq, t, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_hybrid_low_precision(dtype: torch.dtype):
    q, k, v = qkv(2, 8, 2, 9, 9)
    ref = hybrid_attention_reference(q, k, v, MIXED, 0.25)
    out = hybrid_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), MIXED, 0.25)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


BAD_INPUTS = {
    "kinds-too-short": (
        (1, 4, 5, 8),
        (1, 2, 5, 8),
        [0, 1, 0],
        "head_kinds has 3 entries",
    ),
    "heads-not-divisible": (
        (1, 6, 5, 8),
        (1, 4, 5, 8),
        [0] * 6,
        "multiple of key/value heads",
    ),
    "unknown-code": (
        (1, 4, 5, 8),
        (1, 2, 5, 8),
        [0, 1, 7, 0],
        "head 2: unknown head kind code 7",
    ),
    "head-dim-mismatch": ((1, 4, 5, 8), (1, 2, 5, 16), [0] * 4, "head dims differ"),
    "too-many-queries": ((1, 4, 6, 8), (1, 2, 5, 8), [0] * 4, "more queries than keys"),
    "not-4d": ((4, 5, 8), (1, 2, 5, 8), [0] * 4, r"expects q \[B, Hq, Tq, D\]"),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_hybrid_rejects_bad_inputs(case):
    q_shape, kv_shape, kinds, message = case
    q, k = torch.zeros(q_shape), torch.zeros(kv_shape)
    with pytest.raises(ValueError, match=message):
        hybrid_attention_reference(q, k, k, kinds, 1.0)


def test_hybrid_rejects_wrong_number_of_head_params():
    q, k, v = qkv(1, 4, 2, 5, 5)
    with pytest.raises(ValueError, match="head_params must be empty or hold exactly the 5 tensors fusion_scale"):
        hybrid_attention_reference(q, k, v, [0] * 4, 1.0, [torch.zeros(4)])


@pytest.mark.parametrize("kind", [HEDGEHOG, GDN], ids=["hedgehog", "gdn"])
def test_hybrid_learned_kinds_need_head_params(kind):
    q, k, v = qkv(1, 4, 2, 5, 5)
    with pytest.raises(ValueError, match=f"head 2 is of the learned kind '{kind.name}', so head_params must hold"):
        hybrid_attention_reference(q, k, v, [0, 1, kind.code, 0], 1.0)


@pytest.mark.parametrize("index", range(5), ids=PARAM_NAMES)
def test_hybrid_rejects_misshaped_head_params(index: int):
    q, k, v = qkv(1, 4, 2, 5, 5, d=16)
    params = make_params(4, 16)
    want = list(params[index].shape)
    params[index] = params[index][..., :-1] if params[index].dim() > 1 else params[index][:-1]
    name = PARAM_NAMES[index]
    message = rf"head_params\[{index}\] \({name}\) must have shape \{want}"
    with pytest.raises(ValueError, match=message):
        hybrid_attention_reference(q, k, v, [0, 1, 2, 3], 1.0, params)


def test_hybrid_rejects_integer_head_params():
    q, k, v = qkv(1, 4, 2, 5, 5, d=16)
    params = make_params(4, 16)
    params[0] = params[0].long()
    with pytest.raises(ValueError, match=r"head_params\[0\] \(fusion_scale\) must be floating point"):
        hybrid_attention_reference(q, k, v, [0, 1, 2, 3], 1.0, params)


BAD_WINDOWS = {
    "missing": ([], "head 1 is 'streaming', so head_windows must hold 2 \\* Hq = 8 ints"),
    "too-short": ([0, 4] * 3, "head_windows must be empty or hold 2 \\* Hq = 8 ints"),
    "zero-window": ([0, 0, 0, 0, 0, 4, 0, 0], "head 1 \\('streaming'\\) needs sink >= 0 and window >= 1"),
    "negative-sink": ([0, 0, -1, 4, 0, 4, 0, 0], "head 1 \\('streaming'\\) needs sink >= 0 and window >= 1"),
}


@pytest.mark.parametrize("case", BAD_WINDOWS.values(), ids=BAD_WINDOWS.keys())
def test_hybrid_rejects_bad_head_windows(case):
    windows, message = case
    q, k, v = qkv(1, 4, 2, 5, 5)
    with pytest.raises(ValueError, match=message):
        hybrid_attention_reference(q, k, v, [0, 4, 4, 1], 1.0, (), windows)


def test_hybrid_ignores_windows_of_other_heads():
    q, k, v = qkv(1, 4, 2, 5, 5)
    out = hybrid_attention_reference(q, k, v, [0, 4, 1, 1], 1.0, (), [-5, 0, 1, 2, 0, 0, 7, -3])
    assert out.shape == (1, 4, 5, 16)
    same = hybrid_attention_reference(q, k, v, [0, 1, 1, 1], 1.0, (), [])
    torch.testing.assert_close(out[:, [0, 2, 3]], same[:, [0, 2, 3]], atol=0, rtol=0)
