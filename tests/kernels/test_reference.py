"""Tests for the head-kind table and the plain-torch reference attention functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hydracc.kernels import (
    ELU,
    FULL,
    KIND_NAMES,
    causal_linear_attention,
    causal_linear_attention_recurrent,
    causal_softmax_attention,
    hybrid_attention_reference,
    kind_by_code,
    kind_by_name,
)

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
    with pytest.raises(KeyError, match="full, elu"):
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


def _per_head(q, k, v, kinds, scale):
    """Compose the hybrid one query head at a time (the slow, obvious way)."""
    hq, group = q.shape[1], q.shape[1] // k.shape[1]
    outs = []
    for h in range(hq):
        qh, kh, vh = (
            q[:, h : h + 1],
            k[:, h // group][:, None],
            v[:, h // group][:, None],
        )
        if kinds[h] == FULL.code:
            outs.append(causal_softmax_attention(qh, kh, vh, scale))
        else:
            outs.append(causal_linear_attention(qh, kh, vh))
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


def test_hybrid_rejects_unused_head_params():
    q, k, v = qkv(1, 4, 2, 5, 5)
    with pytest.raises(ValueError, match="head_params"):
        hybrid_attention_reference(q, k, v, [0] * 4, 1.0, [torch.zeros(4)])
