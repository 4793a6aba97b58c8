"""The hedgehog, gdn and streaming head kinds: per-kind forms, the state step API and fusion."""

from __future__ import annotations

import pytest
import torch

from hydracc.kernels import (
    ELU,
    FULL,
    GDN,
    HEAD_KINDS,
    HEDGEHOG,
    PARAM_NAMES,
    STREAMING,
    causal_linear_attention,
    causal_softmax_attention,
    causal_streaming_attention,
    fuse_linear_output,
    gated_delta_rule,
    gated_delta_rule_recurrent,
    gdn_gates,
    hedgehog_attention,
    hedgehog_attention_recurrent,
    hedgehog_feature_map,
    kind_by_code,
    kind_by_name,
    linear_state_step,
    param_shapes,
    run_kind,
    streaming_attention,
)
from hydracc.kernels.kinds.elu import causal_linear_attention_step
from kernel_ops.kernel_cases import ATOL, RTOL, gen, make_params, param_dict, qkv, rand

LENGTHS = [1, 7, 33, 65, 130]


# --- the table ----------------------------------------------------------------------


def test_new_kinds_in_table():
    assert [k.name for k in HEAD_KINDS] == ["full", "elu", "hedgehog", "gdn", "streaming"]
    assert [k.code for k in HEAD_KINDS] == [0, 1, 2, 3, 4]  # codes are a file format
    assert kind_by_name("hedgehog") is HEDGEHOG and kind_by_code(2) is HEDGEHOG
    assert kind_by_name("gdn") is GDN and kind_by_code(3) is GDN
    assert kind_by_name("streaming") is STREAMING and kind_by_code(4) is STREAMING
    assert [(k.linear, k.keeps_kv, k.learned) for k in HEAD_KINDS] == [
        (False, True, False),
        (True, False, False),
        (True, False, True),
        (True, False, True),
        (False, False, False),
    ]
    assert STREAMING.plan_params == ("sink", "window")
    assert FULL.plan_params == ELU.plan_params == HEDGEHOG.plan_params == GDN.plan_params == ()


def test_param_shapes():
    assert PARAM_NAMES == ("fusion_scale", "hedgehog_weight", "hedgehog_bias", "gdn_gate_weight", "gdn_gate_bias")
    shapes = param_shapes(6, 12)
    assert tuple(shapes) == PARAM_NAMES
    assert list(shapes.values()) == [(6,), (6, 12, 12), (6, 12), (6, 12, 2), (6, 2)]


# --- hedgehog -----------------------------------------------------------------------


def test_hedgehog_feature_map_is_two_distributions():
    x = rand(2, 3, 5, 8, seed=1) * 4
    weight, bias = rand(3, 8, 8, seed=2), rand(3, 8, seed=3)
    phi = hedgehog_feature_map(x, weight, bias)
    assert phi.shape == (2, 3, 5, 16)
    assert (phi > 0).all()
    torch.testing.assert_close(phi[..., :8].sum(-1), torch.ones(2, 3, 5))
    torch.testing.assert_close(phi[..., 8:].sum(-1), torch.ones(2, 3, 5))
    # the two halves are softmax(+proj) and softmax(-proj), per head with that head's W, b
    proj = x[:, 1] @ weight[1] + bias[1]
    torch.testing.assert_close(phi[:, 1], torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1))


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("dv", [16, 8], ids=["dv=d", "dv<d"])
def test_hedgehog_recurrent_matches_parallel(t: int, dv: int):
    q, k, v = qkv(2, 3, 3, t, t, dv=dv, seed=t)
    p = param_dict(make_params(3, 16, seed=t), slice(None))
    par = hedgehog_attention(q, k, v, p["hedgehog_weight"], p["hedgehog_bias"])
    rec = hedgehog_attention_recurrent(q, k, v, p["hedgehog_weight"], p["hedgehog_bias"])
    assert par.shape == (2, 3, t, dv)
    torch.testing.assert_close(par, rec, atol=ATOL, rtol=RTOL)


def test_hedgehog_bottom_right_alignment():
    q, k, v = qkv(2, 2, 2, 33, 33, seed=4)
    p = param_dict(make_params(2, 16, seed=4), slice(None))
    w, b = p["hedgehog_weight"], p["hedgehog_bias"]
    full = hedgehog_attention(q, k, v, w, b)
    for tq in (1, 5):
        torch.testing.assert_close(hedgehog_attention(q[:, :, -tq:], k, v, w, b), full[:, :, -tq:], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            hedgehog_attention_recurrent(q[:, :, -tq:], k, v, w, b), full[:, :, -tq:], atol=ATOL, rtol=RTOL
        )


def test_hedgehog_is_not_elu():
    q, k, v = qkv(1, 2, 2, 9, 9, seed=5)
    p = param_dict(make_params(2, 16, seed=5), slice(None))
    out = hedgehog_attention(q, k, v, p["hedgehog_weight"], p["hedgehog_bias"])
    assert (out - causal_linear_attention(q, k, v)).abs().max() > 1e-2


# --- gdn ------------------------------------------------------------------------------


def _gdn_by_matrices(q, k, v, w, b):
    """The gated delta rule written with explicit D x D matrices, one head at a time."""
    outs = torch.zeros(*q.shape[:3], v.shape[-1])
    for bi in range(q.shape[0]):
        for h in range(q.shape[1]):
            s = torch.zeros(q.shape[-1], v.shape[-1])
            for t in range(q.shape[2]):
                kt = k[bi, h, t] / torch.sqrt(k[bi, h, t].square().sum() + 1e-6)
                qt = q[bi, h, t] / torch.sqrt(q[bi, h, t].square().sum() + 1e-6)
                a, c = k[bi, h, t] @ w[h] + b[h]
                alpha, beta = torch.exp(-torch.nn.functional.softplus(a)), torch.sigmoid(c)
                s = alpha * (torch.eye(len(kt)) - beta * torch.outer(kt, kt)) @ s + beta * torch.outer(kt, v[bi, h, t])
                outs[bi, h, t] = s.T @ qt
    return outs


def test_gdn_recurrent_is_the_gated_delta_rule():
    q, k, v = qkv(2, 2, 2, 6, 6, d=8, dv=4, seed=6)
    p = param_dict(make_params(2, 8, seed=6), slice(None))
    out, _ = gated_delta_rule_recurrent(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"])
    torch.testing.assert_close(out, _gdn_by_matrices(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"]))


def test_gdn_gates():
    k = rand(1, 2, 3, 4, seed=7)
    w, b = rand(2, 4, 2, seed=8), rand(2, 2, seed=9)
    log_alpha, beta = gdn_gates(k, w, b)
    raw = torch.einsum("bhtd,hdg->bhtg", k, w) + b[:, None]
    torch.testing.assert_close(log_alpha, -torch.nn.functional.softplus(raw[..., 0]))
    torch.testing.assert_close(beta, torch.sigmoid(raw[..., 1]))
    assert (log_alpha < 0).all() and ((beta > 0) & (beta < 1)).all()


@pytest.mark.parametrize("chunk", [64, 16])
@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
def test_gdn_chunked_matches_recurrent(t: int, chunk: int, with_state: bool):
    q, k, v = qkv(2, 3, 3, t, t, dv=8, seed=t + chunk)
    p = param_dict(make_params(3, 16, seed=t), slice(None))
    s0 = rand(2, 3, 16, 8, seed=t) if with_state else None
    rec, rec_state = gated_delta_rule_recurrent(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"], s0)
    out, state = gated_delta_rule(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"], s0, chunk_size=chunk)
    assert out.shape == (2, 3, t, 8) and state.shape == (2, 3, 16, 8) and state.dtype == torch.float32
    # Within a chunk the chunked form sums up to 64 products in a different order; observed
    # max |error| is ~2e-6 at T=130, so the usual 1e-5 holds.
    torch.testing.assert_close(out, rec, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state, rec_state, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("t", [1, 7, 65])
def test_gdn_export_form_matches_recurrent(t: int):
    """The form ``torch.export`` (ONNX) takes: the recurrence as a ``scan`` over tokens."""
    from hydracc.kernels.kinds.gdn import _gdn_inputs, _gdn_scan_core

    q, k, v = qkv(2, 3, 3, t, t, dv=8, seed=t)
    p = param_dict(make_params(3, 16, seed=t), slice(None))
    s0 = rand(2, 3, 16, 8, seed=t + 1)
    rec, rec_state = gated_delta_rule_recurrent(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"], s0)
    qn, kn, vf, log_alpha, beta = _gdn_inputs(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"])
    out, state = _gdn_scan_core(qn, kn, vf, log_alpha, beta, s0.clone())
    torch.testing.assert_close(out, rec, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state, rec_state, atol=ATOL, rtol=RTOL)


def test_gdn_bottom_right_alignment():
    q, k, v = qkv(2, 2, 2, 40, 40, seed=10)
    p = param_dict(make_params(2, 16, seed=10), slice(None))
    w, b = p["gdn_gate_weight"], p["gdn_gate_bias"]
    full, full_state = gated_delta_rule(q, k, v, w, b, chunk_size=16)
    for tq in (1, 7):
        out, state = gated_delta_rule(q[:, :, -tq:], k, v, w, b, chunk_size=16)
        torch.testing.assert_close(out, full[:, :, -tq:], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(state, full_state)
        rec, _ = gated_delta_rule_recurrent(q[:, :, -tq:], k, v, w, b)
        torch.testing.assert_close(rec, full[:, :, -tq:], atol=ATOL, rtol=RTOL)


def test_gdn_chunked_gradients_match_recurrent():
    q, k, v = qkv(1, 2, 2, 21, 21, d=8, dv=4, seed=11)
    p = param_dict(make_params(2, 8, seed=11), slice(None))
    s0 = rand(1, 2, 8, 4, seed=12)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"], s0)]
    grad_out, grad_state = rand(1, 2, 21, 4, seed=13), rand(1, 2, 8, 4, seed=14)

    def grads(fn):
        out, state = fn(*leaves)
        return torch.autograd.grad((out * grad_out).sum() + (state * grad_state).sum(), leaves)

    want = grads(gated_delta_rule_recurrent)
    got = grads(lambda *a: gated_delta_rule(*a, chunk_size=8))
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 0
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


# --- streaming ----------------------------------------------------------------------


def _streaming_brute(q, k, v, scale, sink, window):
    """One query at a time over the keys it may see (what the decode cache does)."""
    tq, tk = q.shape[2], k.shape[2]
    outs = []
    for i in range(tq):
        p = tk - tq + i
        keep = [j for j in range(p + 1) if j < sink or j > p - window]
        idx = torch.tensor(keep)
        scores = q[:, :, i : i + 1] @ k[:, :, idx].transpose(-1, -2) * scale
        outs.append(scores.softmax(dim=-1) @ v[:, :, idx])
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize(("sink", "window"), [(0, 1), (0, 4), (2, 3), (4, 1), (5, 40)])
@pytest.mark.parametrize("tq", [1, 6, 33], ids=["decode", "chunk", "all"])
def test_streaming_matches_brute_force(sink: int, window: int, tq: int):
    q, k, v = qkv(2, 2, 2, tq, 33, seed=15)
    out = causal_streaming_attention(q, k, v, 0.3, sink, window)
    torch.testing.assert_close(out, _streaming_brute(q, k, v, 0.3, sink, window), atol=ATOL, rtol=RTOL)


def test_streaming_on_trimmed_keys_matches_whole_sequence():
    """The decode cache's call: keys trimmed to the first `sink` and last `window` positions."""
    sink, window, t = 3, 5, 30
    q, k, v = qkv(2, 2, 2, t, t, seed=16)
    whole = causal_streaming_attention(q, k, v, 0.25, sink, window)
    positions = torch.arange(t)
    for p in range(t):
        kept = positions[: p + 1]
        kept = torch.cat([kept[:sink], kept[sink:][-window:]])
        out = streaming_attention(q[:, :, p : p + 1], k[:, :, kept], v[:, :, kept], 0.25, sink, window,
                                  positions[p : p + 1], kept)
        torch.testing.assert_close(out, whole[:, :, p : p + 1], atol=ATOL, rtol=RTOL)
    # a chunk of queries against the cache of the step before plus the chunk's own keys
    kept = torch.cat([positions[:sink], positions[20 - window : 20], positions[20:26]])
    out = streaming_attention(q[:, :, 20:26], k[:, :, kept], v[:, :, kept], 0.25, sink, window, positions[20:26], kept)
    torch.testing.assert_close(out, whole[:, :, 20:26], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("sink", [0, 3])
def test_streaming_with_large_window_is_full_attention(sink: int):
    q, k, v = qkv(2, 3, 3, 5, 17, seed=17)
    full = causal_softmax_attention(q, k, v, 0.3)
    torch.testing.assert_close(causal_streaming_attention(q, k, v, 0.3, sink, 17), full, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(causal_streaming_attention(q, k, v, 0.3, sink, 1000), full, atol=ATOL, rtol=RTOL)


def test_streaming_with_small_window_differs():
    q, k, v = qkv(2, 3, 3, 17, 17, seed=18)
    full = causal_softmax_attention(q, k, v, 0.3)
    out = causal_streaming_attention(q, k, v, 0.3, 2, 4)
    torch.testing.assert_close(out[:, :, :6], full[:, :, :6], atol=ATOL, rtol=RTOL)  # sink + window cover these
    assert (out[:, :, 6:] - full[:, :, 6:]).abs().max() > 1e-2


def test_streaming_query_without_keys_gets_zeros():
    q, k, v = qkv(1, 1, 1, 1, 2, seed=19)
    out = streaming_attention(q, k, v, 1.0, 0, 2, torch.tensor([9]), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out))


def test_streaming_rejects_bad_window():
    q, k, v = qkv(1, 1, 1, 3, 3)
    with pytest.raises(ValueError, match="window >= 1"):
        causal_streaming_attention(q, k, v, 1.0, 0, 0)
    with pytest.raises(ValueError, match="sink >= 0"):
        causal_streaming_attention(q, k, v, 1.0, -1, 2)
    with pytest.raises(ValueError, match="window >= 1"):
        run_kind(STREAMING.code, q, k, v, 1.0)


# --- run_kind -------------------------------------------------------------------------


def test_run_kind_dispatch():
    q, k, v = qkv(2, 4, 4, 9, 9, seed=20)
    params = make_params(4, 16, seed=20)
    p = param_dict(params, slice(None))
    torch.testing.assert_close(run_kind(FULL.code, q, k, v, 0.3), causal_softmax_attention(q, k, v, 0.3))
    torch.testing.assert_close(run_kind(ELU.code, q, k, v, 0.3), causal_linear_attention(q, k, v))
    torch.testing.assert_close(
        run_kind(HEDGEHOG.code, q, k, v, 0.3, p), hedgehog_attention(q, k, v, p["hedgehog_weight"], p["hedgehog_bias"])
    )
    torch.testing.assert_close(
        run_kind(GDN.code, q, k, v, 0.3, p), gated_delta_rule(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"])[0]
    )
    torch.testing.assert_close(
        run_kind(STREAMING.code, q, k, v, 0.3, sink=1, window=3), causal_streaming_attention(q, k, v, 0.3, 1, 3)
    )
    for code in (HEDGEHOG.code, GDN.code):
        with pytest.raises(ValueError, match="needs the parameter"):
            run_kind(code, q, k, v, 0.3)
    with pytest.raises(ValueError, match="unknown head kind code 9"):
        run_kind(9, q, k, v, 0.3)


# --- the state step API -------------------------------------------------------------------


def _random_split(t: int, seed: int) -> list[int]:
    g = gen(seed)
    sizes = []
    while sum(sizes) < t:
        sizes.append(min(int(torch.randint(1, 40, (1,), generator=g)), t - sum(sizes)))
    return sizes


def _whole(code: int, q, k, v, p):
    if code == GDN.code:
        return gated_delta_rule_recurrent(q, k, v, p["gdn_gate_weight"], p["gdn_gate_bias"])[0]
    return run_kind(code, q, k, v, 1.0, p)


@pytest.mark.parametrize("code", [ELU.code, HEDGEHOG.code, GDN.code], ids=["elu", "hedgehog", "gdn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_state_step_over_random_chunks_matches_whole_sequence(code: int, seed: int):
    t = 97
    q, k, v = qkv(2, 3, 3, t, t, dv=8, seed=seed + 30)
    p = param_dict(make_params(3, 16, seed=seed), slice(None))
    split = _random_split(t, seed) + [1]  # ... and decode steps at the end
    q, k, v = (torch.cat([x, x[:, :, :1]], dim=2) for x in (q, k, v))
    state, outs, at = None, [], 0
    for n in split:
        out, state = linear_state_step(code, q[:, :, at : at + n], k[:, :, at : at + n], v[:, :, at : at + n], state, p)
        assert all(s.dtype == torch.float32 for s in state)
        outs.append(out)
        at += n
    torch.testing.assert_close(torch.cat(outs, dim=2), _whole(code, q, k, v, p), atol=ATOL, rtol=RTOL)
    # the state does not depend on how the sequence was split
    _, one_shot = linear_state_step(code, q, k, v, None, p)
    assert len(one_shot) == (1 if code == GDN.code else 2)
    for a, b in zip(state, one_shot, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=RTOL)


def test_state_step_shapes_and_errors():
    q, k, v = qkv(2, 3, 3, 4, 4, dv=8)
    p = param_dict(make_params(3, 16), slice(None))
    _, (s, z) = linear_state_step(ELU.code, q, k, v, None)
    assert s.shape == (2, 3, 16, 8) and z.shape == (2, 3, 16)
    _, (s, z) = linear_state_step(HEDGEHOG.code, q, k, v, None, p)
    assert s.shape == (2, 3, 32, 8) and z.shape == (2, 3, 32)
    _, (s,) = linear_state_step(GDN.code, q, k, v, None, p)
    assert s.shape == (2, 3, 16, 8)
    for code in (FULL.code, STREAMING.code):
        with pytest.raises(ValueError, match="not a linear kind"):
            linear_state_step(code, q, k, v, None)
    with pytest.raises(ValueError, match="needs the parameter"):
        linear_state_step(GDN.code, q, k, v, None)
    with pytest.raises(ValueError, match="one query per new token"):
        linear_state_step(ELU.code, q[:, :, :1], k, v, None)
    with pytest.raises(ValueError, match="state must be"):
        linear_state_step(ELU.code, q, k, v, (torch.zeros(2, 3, 32, 8), torch.zeros(2, 3, 32)))


def test_causal_linear_attention_step_still_works():
    q, k, v = qkv(2, 2, 2, 20, 20, seed=40)
    o1, s, z = causal_linear_attention_step(q[:, :, :13], k[:, :, :13], v[:, :, :13], None, None)
    o2, s, z = causal_linear_attention_step(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], s, z)
    torch.testing.assert_close(torch.cat([o1, o2], 2), causal_linear_attention(q, k, v), atol=ATOL, rtol=RTOL)


# --- fusion ---------------------------------------------------------------------------


def test_fuse_linear_output_sets_rms():
    out = rand(2, 3, 5, 8, seed=41) * torch.tensor([0.01, 1.0, 30.0])[:, None, None]
    scale = torch.tensor([0.5, 1.0, 2.0])
    fused = fuse_linear_output(out, scale)
    rms = fused.square().mean(-1).sqrt()
    mean_sq = out.square().mean(-1)
    torch.testing.assert_close(rms, scale[:, None] * (mean_sq / (mean_sq + 1e-6)).sqrt())  # eps inside the sqrt
    torch.testing.assert_close(rms[:, 1:], scale[1:, None].expand(2, 2, 5))  # RMS == fusion_scale unless tiny
    # direction kept
    torch.testing.assert_close(fused / fused.norm(dim=-1, keepdim=True), out / out.norm(dim=-1, keepdim=True))
    half = fuse_linear_output(out.to(torch.bfloat16), scale)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="scale_rows"):
        fuse_linear_output(out, scale[:2])
