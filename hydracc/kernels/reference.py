"""Plain-torch reference implementations of every head kind and of the hybrid layer.

Design: these are the definitions the Triton kernels are tested against, so they
favour readability over speed. Shapes are ``[B, H, T, D]`` (heads before time, as
SDPA takes them); inputs may be strided views. Everything is computed in float32 and
cast back to ``q.dtype`` once at the end. When ``Tq < Tk`` the queries are the *last*
``Tq`` positions (causal mask aligned bottom-right), as in prefill-with-cache and decode.
``validate_hybrid_inputs`` looks at shapes only, so it also runs on fake/meta tensors.
All functions are differentiable with ordinary torch autograd.

Each recurrent kind has a readable one-token-at-a-time form (``*_recurrent``) and the
form the hybrid layer runs: the masked quadratic form for ``elu``/``hedgehog``, the
chunked WY form for ``gdn`` (exact up to fp32 rounding, fast enough to backpropagate
through, which the op's backward does). Per-kind parameters (``weight``, ``gate_weight``
...) have one row per head passed, i.e. already selected for these heads. Scale-normalized
fusion (``fuse_linear_output``) is applied by the hybrid layer and the decode cache, never
by the per-kind functions, ``run_kind`` or ``linear_state_step``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hydracc.kernels.head_kinds import (
    ELU,
    FULL,
    GDN,
    HEDGEHOG,
    PARAM_NAMES,
    STREAMING,
    kind_by_code,
    param_shapes,
)

EPS = 1e-6  # linear-attention denominator, L2 normalization and fusion RMS
GDN_CHUNK = 64  # default chunk size of the chunked gated delta rule


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Same-head-count checks for the per-kind functions below."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape [B, H, T, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must agree on batch and heads (and k, v on length), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} != {k.shape[-1]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries than keys: Tq={q.shape[2]} > Tk={k.shape[2]}")


def _causal_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """``[Tq, Tk]`` bool, True where query i (at position Tk - Tq + i) may see key j."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


# --- full and streaming softmax heads ---------------------------------------------


def causal_softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal softmax attention.

    q: ``[B, H, Tq, D]``, k: ``[B, H, Tk, D]``, v: ``[B, H, Tk, Dv]``, ``Tq <= Tk``
    (caller expands GQA heads). Returns ``[B, H, Tq, Dv]`` in ``q.dtype``.
    """
    _check_qkv(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    scores = scores.masked_fill(~_causal_mask(tq, tk, q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def streaming_mask(q_positions: Tensor, k_positions: Tensor, sink: int, window: int) -> Tensor:
    """``[Tq, Tk]`` bool: query at position p sees key j iff ``j <= p`` and
    (``j < sink`` or ``j > p - window``)."""
    p, j = q_positions[:, None], k_positions[None, :]
    return (j <= p) & ((j < sink) | (j > p - window))


def _check_window(sink: int, window: int) -> None:
    if window < 1 or sink < 0:
        raise ValueError(f"streaming attention needs sink >= 0 and window >= 1, got sink={sink}, window={window}")


def streaming_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    sink: int,
    window: int,
    q_positions: Tensor,
    k_positions: Tensor,
) -> Tensor:
    """Softmax attention of a streaming head, masked by absolute positions.

    q ``[B, H, Tq, D]`` at positions ``q_positions`` ``[Tq]``; k, v ``[B, H, Tk, *]`` at
    positions ``k_positions`` ``[Tk]`` (any subset of earlier positions, e.g. the decode
    cache's first ``sink`` and last ``window`` keys). The query at p sees key j iff
    ``j <= p and (j < sink or j > p - window)``. A query that sees no key gets zeros.
    Returns ``[B, H, Tq, Dv]`` in ``q.dtype``.
    """
    _check_window(sink, window)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"expected q [B, H, Tq, D], k [B, H, Tk, D], v [B, H, Tk, Dv], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q_positions.shape != (q.shape[2],) or k_positions.shape != (k.shape[2],):
        raise ValueError(
            f"need one position per query and per key, got {tuple(q_positions.shape)} for Tq={q.shape[2]} "
            f"and {tuple(k_positions.shape)} for Tk={k.shape[2]}"
        )
    mask = streaming_mask(q_positions.to(q.device), k_positions.to(q.device), sink, window)
    seen = mask.any(dim=-1, keepdim=True)  # [Tq, 1]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~(mask | ~seen), float("-inf"))  # a blind row stays finite ...
    probs = scores.softmax(dim=-1).masked_fill(~seen, 0.0)  # ... and is zeroed here
    return (probs @ v.float()).to(q.dtype)


def causal_streaming_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, sink: int, window: int) -> Tensor:
    """:func:`streaming_attention` over a whole sequence: keys at ``0..Tk-1``, queries the
    last ``Tq`` of them (bottom-right, as :func:`causal_softmax_attention`)."""
    _check_qkv(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    k_pos = torch.arange(tk, device=q.device)
    return streaming_attention(q, k, v, scale, sink, window, k_pos[tk - tq :], k_pos)


# --- normalized linear attention: elu and hedgehog feature maps --------------------


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1, positive everywhere (the ``elu`` head kind's feature map)."""
    return F.elu(x) + 1.0


def hedgehog_feature_map(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The ``hedgehog`` kind's learned feature map, ``[B, H, T, D] -> [B, H, T, 2D]``.

    ``phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))]`` with ``weight`` ``[H, D, D]``
    and ``bias`` ``[H, D]`` (one row per head of ``x``). Computed in float32.
    """
    proj = torch.einsum("bhtd,hde->bhte", x.float(), weight.float()) + bias.float()[:, None, :]
    return torch.cat([proj.softmax(dim=-1), (-proj).softmax(dim=-1)], dim=-1)


def _linear_parallel(fq: Tensor, fk: Tensor, v: Tensor, eps: float) -> Tensor:
    """Normalized causal linear attention on feature-mapped q, k (fp32, bottom-right)."""
    tq, tk = fq.shape[2], fk.shape[2]
    weights = fq @ fk.transpose(-1, -2)  # [B, H, Tq, Tk], all >= 0
    weights = weights.masked_fill(~_causal_mask(tq, tk, fq.device), 0.0)
    numer = weights @ v  # phi(q_t) . S_t
    denom = weights.sum(dim=-1, keepdim=True) + eps  # phi(q_t) . z_t + eps
    return numer / denom


def _linear_recurrent(fq: Tensor, fk: Tensor, v: Tensor, eps: float) -> Tensor:
    """The same as :func:`_linear_parallel`, one key at a time with explicit state ``S``, ``z``."""
    b, h, tq, f = fq.shape
    tk, dv = fk.shape[2], v.shape[-1]
    state = fq.new_zeros(b, h, f, dv)  # S_t
    norm = fq.new_zeros(b, h, f)  # z_t
    outs = []
    for s in range(tk):
        state = state + fk[:, :, s, :, None] * v[:, :, s, None, :]
        norm = norm + fk[:, :, s]
        i = s - (tk - tq)  # index of the query at position s, if any
        if i >= 0:
            numer = torch.einsum("bhd,bhde->bhe", fq[:, :, i], state)
            denom = (fq[:, :, i] * norm).sum(dim=-1, keepdim=True) + eps
            outs.append(numer / denom)
    if not outs:
        return fq.new_empty(b, h, 0, dv)
    return torch.stack(outs, dim=2)


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """Normalized causal linear attention, parallel (quadratic, masked) form.

    ``out_t = phi(q_t) . S_t / (phi(q_t) . z_t + eps)`` with
    ``S_t = sum_{s<=t} phi(k_s) v_s^T`` and ``z_t = sum_{s<=t} phi(k_s)``.
    Shapes as in :func:`causal_softmax_attention` (query i sits at position Tk - Tq + i).
    """
    _check_qkv(q, k, v)
    out = _linear_parallel(elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), eps)
    return out.to(q.dtype)


def causal_linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """The same as :func:`causal_linear_attention`, one key at a time with explicit state.

    State per head: ``S`` ``[D, Dv]`` and ``z`` ``[D]``. This is the readable definition
    (and what decode does); it is slow, use it for tests.
    """
    _check_qkv(q, k, v)
    out = _linear_recurrent(elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), eps)
    return out.to(q.dtype)


def hedgehog_attention(q: Tensor, k: Tensor, v: Tensor, weight: Tensor, bias: Tensor, eps: float = EPS) -> Tensor:
    """Normalized causal linear attention with the hedgehog feature map (parallel form).

    As :func:`causal_linear_attention` with ``phi = hedgehog_feature_map(., weight, bias)``
    (state dim 2D); ``weight`` ``[H, D, D]``, ``bias`` ``[H, D]``.
    """
    _check_qkv(q, k, v)
    fq, fk = hedgehog_feature_map(q, weight, bias), hedgehog_feature_map(k, weight, bias)
    return _linear_parallel(fq, fk, v.float(), eps).to(q.dtype)


def hedgehog_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, weight: Tensor, bias: Tensor, eps: float = EPS
) -> Tensor:
    """:func:`hedgehog_attention`, one key at a time with explicit state (slow; for tests)."""
    _check_qkv(q, k, v)
    fq, fk = hedgehog_feature_map(q, weight, bias), hedgehog_feature_map(k, weight, bias)
    return _linear_recurrent(fq, fk, v.float(), eps).to(q.dtype)


# --- gated delta rule (gdn) ---------------------------------------------------------


def l2_normalize(x: Tensor, eps: float = EPS) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in float32."""
    x = x.float()
    return x * (x.square().sum(dim=-1, keepdim=True) + eps).rsqrt()


def gdn_gates(k: Tensor, gate_weight: Tensor, gate_bias: Tensor) -> tuple[Tensor, Tensor]:
    """The ``gdn`` gates from the *raw* key: ``(log_alpha, beta)``, each ``[B, H, T]`` fp32.

    ``a, c = k_t W_h + b_h`` (``gate_weight`` ``[H, D, 2]``, ``gate_bias`` ``[H, 2]``);
    ``log_alpha = -softplus(a)`` (decay in (0, 1)), ``beta = sigmoid(c)`` (write strength).
    """
    gates = torch.einsum("bhtd,hdg->bhtg", k.float(), gate_weight.float()) + gate_bias.float()[:, None, :]
    return -F.softplus(gates[..., 0]), torch.sigmoid(gates[..., 1])


def _gdn_inputs(
    q: Tensor, k: Tensor, v: Tensor, gate_weight: Tensor, gate_bias: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Normalized q (zero-padded in front to Tk), normalized k, v, log_alpha, beta; fp32."""
    _check_qkv(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    qn = F.pad(l2_normalize(q), (0, 0, tk - tq, 0))  # a zero query reads nothing
    log_alpha, beta = gdn_gates(k, gate_weight, gate_bias)
    return qn, l2_normalize(k), v.float(), log_alpha, beta


def _gdn_state(state: Tensor | None, b: int, h: int, d: int, dv: int, like: Tensor) -> Tensor:
    if state is None:
        return like.new_zeros(b, h, d, dv)
    if tuple(state.shape) != (b, h, d, dv):
        raise ValueError(f"gdn state must have shape {(b, h, d, dv)}, got {tuple(state.shape)}")
    return state.float()


def _gdn_recurrent_core(
    qn: Tensor, kn: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = S_t^T q_t``."""
    alpha = log_alpha.exp()
    outs = []
    for t in range(qn.shape[2]):
        k_t, a_t, b_t = kn[:, :, t], alpha[:, :, t, None, None], beta[:, :, t, None, None]
        read = torch.einsum("bhd,bhde->bhe", k_t, state)  # k_t^T S_{t-1}
        state = a_t * (state - b_t * k_t[..., :, None] * read[..., None, :]) + b_t * k_t[..., :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", qn[:, :, t], state))
    out = torch.stack(outs, dim=2) if outs else v.new_empty(*v.shape[:2], 0, v.shape[-1])
    return out, state


def _gdn_chunked_core(
    qn: Tensor, kn: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """:func:`_gdn_recurrent_core` in chunks (WY representation, UT transform).

    Within a chunk with cumulative log decay ``g`` (``gamma = exp(g)``) and start state
    ``S0``, write ``S_t = alpha_t S_{t-1} + k_t u_t^T``. Then ``u_t = beta_t (v_t -
    gamma_t S0^T k_t - sum_{i<t} (gamma_t / gamma_i) (k_t . k_i) u_i)``, i.e.
    ``(I + diag(beta) L) U = diag(beta) V - diag(beta gamma) K S0`` with ``L`` strictly lower
    triangular; one unit-triangular solve gives ``U = U' - W S0``. Outputs are
    ``O = diag(gamma) Q S0 + (M * Q K^T) U`` (``M_ti = gamma_t / gamma_i``, ``i <= t``) and the
    next start state is ``gamma_C S0 + (K * gamma_C / gamma)^T U``. Only the last two steps
    run chunk after chunk. Padding tokens (k = v = 0, alpha = 1, beta = 0) leave the state
    as it was, so any T works.
    """
    b, h, t, d = qn.shape
    dv = v.shape[-1]
    if t == 0:
        return v.new_empty(b, h, 0, dv), state
    c = min(chunk_size, t)
    pad = (-t) % c
    if pad:
        qn, kn, v = (F.pad(x, (0, 0, 0, pad)) for x in (qn, kn, v))
        log_alpha, beta = F.pad(log_alpha, (0, pad)), F.pad(beta, (0, pad))
    n = (t + pad) // c
    qn, kn, v = (x.reshape(b, h, n, c, x.shape[-1]) for x in (qn, kn, v))
    g = log_alpha.reshape(b, h, n, c).cumsum(dim=-1)  # log gamma, non-increasing
    beta = beta.reshape(b, h, n, c)

    incl = torch.ones(c, c, dtype=torch.bool, device=qn.device).tril()
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~incl, float("-inf")).exp()  # M, zero above
    lower = (kn @ kn.transpose(-1, -2) * decay).tril(diagonal=-1)  # L, strictly lower
    system = beta[..., :, None] * lower + torch.eye(c, dtype=qn.dtype, device=qn.device)
    rhs = torch.cat([beta[..., None] * v, (beta * g.exp())[..., None] * kn], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_part, w = solved[..., :dv], solved[..., dv:]  # U', W
    scores = (qn @ kn.transpose(-1, -2)) * decay  # M * Q K^T
    q_decayed = qn * g.exp()[..., None]
    g_last = g[..., -1:]  # [B, H, N, 1]
    k_decayed = kn * (g_last - g).exp()[..., None]

    outs = []
    for i in range(n):
        u = u_part[:, :, i] - w[:, :, i] @ state
        outs.append(q_decayed[:, :, i] @ state + scores[:, :, i] @ u)
        state = g_last[:, :, i, :, None].exp() * state + k_decayed[:, :, i].transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).reshape(b, h, n * c, dv)[:, :, :t]
    return out, state


def gated_delta_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``gdn`` head kind, one token at a time (the readable definition; slow).

    ``q_t``, ``k_t`` are L2-normalized; gates from the raw key (:func:`gdn_gates`);
    ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` (``S`` ``[D, Dv]``
    per head, fp32) and ``o_t = S_t^T q_t``. q ``[B, H, Tq, D]`` (the last Tq positions),
    k ``[B, H, Tk, D]``, v ``[B, H, Tk, Dv]``; ``initial_state`` ``[B, H, D, Dv]`` or None
    (zeros). Returns ``(out [B, H, Tq, Dv] in q.dtype, final state [B, H, D, Dv] fp32)``.
    """
    qn, kn, vf, log_alpha, beta = _gdn_inputs(q, k, v, gate_weight, gate_bias)
    state = _gdn_state(initial_state, *k.shape[:2], k.shape[-1], v.shape[-1], vf)
    out, state = _gdn_recurrent_core(qn, kn, vf, log_alpha, beta, state)
    return out[:, :, out.shape[2] - q.shape[2] :].to(q.dtype), state


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = GDN_CHUNK,
) -> tuple[Tensor, Tensor]:
    """:func:`gated_delta_rule_recurrent` in chunks of ``chunk_size`` tokens (prefill form).

    Exact up to fp32 rounding for any T (the last chunk is padded); differentiable.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    qn, kn, vf, log_alpha, beta = _gdn_inputs(q, k, v, gate_weight, gate_bias)
    state = _gdn_state(initial_state, *k.shape[:2], k.shape[-1], v.shape[-1], vf)
    out, state = _gdn_chunked_core(qn, kn, vf, log_alpha, beta, state, chunk_size)
    return out[:, :, out.shape[2] - q.shape[2] :].to(q.dtype), state


# --- fusion -----------------------------------------------------------------------


def fuse_linear_output(out: Tensor, scale_rows: Tensor, eps: float = EPS) -> Tensor:
    """Scale-normalized fusion of linear heads' outputs.

    ``out`` ``[B, H, T, Dv]``, ``scale_rows`` ``[H]`` (``fusion_scale`` rows of these heads):
    ``out_h * fusion_scale[h] / sqrt(mean(out_h^2 over Dv) + eps)``, per token. Computed
    in float32, returned in ``out.dtype``.
    """
    if out.dim() != 4 or scale_rows.shape != (out.shape[1],):
        raise ValueError(f"expected out [B, H, T, Dv] and scale_rows [H], got {tuple(out.shape)}, {tuple(scale_rows.shape)}")
    o = out.float()
    rms_inv = (o.square().mean(dim=-1, keepdim=True) + eps).rsqrt()
    return (o * rms_inv * scale_rows.float()[:, None, None]).to(out.dtype)


# --- the hybrid layer ---------------------------------------------------------------


def validate_hybrid_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
) -> None:
    """Check the arguments of the hybrid layer; shapes only, so fake/meta tensors work.

    ``head_params``: empty, or exactly the tensors named by ``PARAM_NAMES`` with the shapes
    of ``param_shapes(Hq, D)`` (required when a head is of a learned kind).
    ``head_windows``: empty, or ``2 * Hq`` ints ``[sink_0, window_0, sink_1, ...]``
    (required when a head is ``streaming``, whose entries need sink >= 0, window >= 1).
    Raises ``ValueError`` naming the problem.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "hybrid attention expects q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, hq, tq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length"
        )
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} != {k.shape[3]}")
    hkv, tk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) "
            "for grouped-query attention"
        )
    if tq > tk:
        raise ValueError(f"more queries than keys: Tq={tq} > Tk={tk}")
    if len(head_kinds) != hq:
        raise ValueError(
            f"head_kinds has {len(head_kinds)} entries but q has {hq} heads (one code per query head)"
        )
    kinds = []
    for h, code in enumerate(head_kinds):
        try:
            kinds.append(kind_by_code(code))
        except KeyError as err:
            raise ValueError(f"head {h}: {err.args[0]}") from None
    _validate_head_params(kinds, head_params, hq, d)
    _validate_head_windows(kinds, head_windows, hq)
    if not (
        q.dtype.is_floating_point
        and k.dtype.is_floating_point
        and v.dtype.is_floating_point
    ):
        raise ValueError(
            f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def _validate_head_params(kinds: list, head_params: Sequence[Tensor], hq: int, d: int) -> None:
    names = ", ".join(PARAM_NAMES)
    if len(head_params) == 0:
        learned = [h for h, kind in enumerate(kinds) if kind.learned]
        if learned:
            h = learned[0]
            raise ValueError(
                f"head {h} is of the learned kind {kinds[h].name!r}, so head_params must hold the "
                f"{len(PARAM_NAMES)} tensors {names} (got none)"
            )
        return
    if len(head_params) != len(PARAM_NAMES):
        raise ValueError(
            f"head_params must be empty or hold exactly the {len(PARAM_NAMES)} tensors {names}, "
            f"in that order; got {len(head_params)} tensors"
        )
    for i, ((name, shape), tensor) in enumerate(zip(param_shapes(hq, d).items(), head_params, strict=True)):
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"head_params[{i}] ({name}) must have shape {list(shape)} for Hq={hq}, D={d}; "
                f"got {list(tensor.shape)}"
            )
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"head_params[{i}] ({name}) must be floating point, got {tensor.dtype}")


def _validate_head_windows(kinds: list, head_windows: Sequence[int], hq: int) -> None:
    streaming = [h for h, kind in enumerate(kinds) if kind.code == STREAMING.code]
    if len(head_windows) == 0:
        if streaming:
            raise ValueError(
                f"head {streaming[0]} is 'streaming', so head_windows must hold 2 * Hq = {2 * hq} ints "
                "[sink_0, window_0, sink_1, window_1, ...] (got none)"
            )
        return
    if len(head_windows) != 2 * hq:
        raise ValueError(
            f"head_windows must be empty or hold 2 * Hq = {2 * hq} ints [sink_0, window_0, ...]; "
            f"got {len(head_windows)}"
        )
    for h in streaming:
        sink, window = head_windows[2 * h], head_windows[2 * h + 1]
        if sink < 0 or window < 1:
            raise ValueError(
                f"head {h} ('streaming') needs sink >= 0 and window >= 1 in head_windows, "
                f"got sink={sink}, window={window}"
            )


def _param(params: Mapping[str, Tensor] | None, name: str, code: int) -> Tensor:
    if params is None or name not in params:
        raise ValueError(f"head kind {kind_by_code(code).name!r} needs the parameter {name!r}")
    return params[name]


def run_kind(
    code: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    params: Mapping[str, Tensor] | None = None,
    sink: int = 0,
    window: int = 0,
) -> Tensor:
    """The reference for heads of one kind, ``code``; q, k, v per query head (GQA expanded).

    ``params``: ``PARAM_NAMES`` entries with rows already selected for these heads (e.g.
    ``hedgehog_weight`` ``[H, D, D]``), needed by learned kinds. ``sink``, ``window``: the
    ``streaming`` kind's settings. No fusion here. ``gdn`` runs the chunked form.
    """
    if code == FULL.code:
        return causal_softmax_attention(q, k, v, scale)
    if code == ELU.code:
        return causal_linear_attention(q, k, v)
    if code == HEDGEHOG.code:
        weight, bias = _param(params, "hedgehog_weight", code), _param(params, "hedgehog_bias", code)
        return hedgehog_attention(q, k, v, weight, bias)
    if code == GDN.code:
        weight, bias = _param(params, "gdn_gate_weight", code), _param(params, "gdn_gate_bias", code)
        return gated_delta_rule(q, k, v, weight, bias)[0]
    if code == STREAMING.code:
        return causal_streaming_attention(q, k, v, scale, sink, window)
    raise ValueError(f"unknown head kind code {code!r}")


def head_groups(
    head_kinds: Sequence[int], group: int, device: torch.device, head_windows: Sequence[int] = ()
) -> Iterator[tuple[int, int, int, Tensor, Tensor]]:
    """Heads that run together: ``(code, sink, window, query head indices, their KV heads)``.

    One group per kind present, except that ``streaming`` heads are split by their
    ``(sink, window)``; other kinds get ``sink = window = 0``.
    """
    keys: dict[tuple[int, int, int], list[int]] = {}
    for h, code in enumerate(head_kinds):
        sink, window = (head_windows[2 * h], head_windows[2 * h + 1]) if code == STREAMING.code else (0, 0)
        keys.setdefault((code, sink, window), []).append(h)
    for (code, sink, window), heads in sorted(keys.items()):
        q_idx = torch.tensor(heads, device=device)
        yield code, sink, window, q_idx, q_idx // group


def select_param_rows(head_params: Sequence[Tensor], q_idx: Tensor) -> dict[str, Tensor]:
    """``{name: rows of query heads q_idx}`` for the ``head_params`` tensors (empty if none)."""
    return {name: t.index_select(0, q_idx) for name, t in zip(PARAM_NAMES, head_params, strict=False)}


def hybrid_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
) -> Tensor:
    """A head-level hybrid attention layer: each query head runs its own kind.

    q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]``, v: ``[B, Hkv, Tk, Dv]`` *unexpanded*
    (query head h reads kv head ``h // (Hq // Hkv)``); ``head_kinds[h]`` is a code from
    :mod:`hydracc.kernels.head_kinds`. ``scale`` applies to softmax heads (full, streaming).
    ``head_params``: empty or the ``PARAM_NAMES`` tensors (rows by query head); when given,
    every linear head's output goes through :func:`fuse_linear_output`.
    ``head_windows``: ``[sink_h, window_h]`` per query head, read for streaming heads.
    Returns ``[B, Hq, Tq, Dv]`` in ``q.dtype``.
    """
    validate_hybrid_inputs(q, k, v, head_kinds, head_params, head_windows)
    b, hq, tq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    group = hq // hkv
    q32, k32, v32 = q.float(), k.float(), v.float()
    out = q32.new_zeros(b, hq, tq, dv)
    for code, sink, window, q_idx, kv_idx in head_groups(head_kinds, group, q.device, head_windows):
        rows = select_param_rows(head_params, q_idx)
        res = run_kind(
            code,
            q32.index_select(1, q_idx),
            k32.index_select(1, kv_idx),
            v32.index_select(1, kv_idx),
            scale,
            rows,
            sink,
            window,
        )
        if rows and kind_by_code(code).linear:
            res = fuse_linear_output(res, rows["fusion_scale"])
        out = out.index_copy(1, q_idx, res)
    return out.to(q.dtype)


# --- decode: linear heads continued from a saved state --------------------------------


def _linear_step(
    fq: Tensor, fk: Tensor, v: Tensor, state: tuple[Tensor, ...] | None, eps: float
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    b, h, t, f = fq.shape
    dv = v.shape[-1]
    if state is None:
        s0, z0 = fq.new_zeros(b, h, f, dv), fq.new_zeros(b, h, f)
    else:
        if len(state) != 2 or tuple(state[0].shape) != (b, h, f, dv) or tuple(state[1].shape) != (b, h, f):
            raise ValueError(
                f"linear attention state must be (S {[b, h, f, dv]}, z {[b, h, f]}), "
                f"got {[list(s.shape) for s in state]}"
            )
        s0, z0 = state[0].float(), state[1].float()
    weights = (fq @ fk.transpose(-1, -2)).masked_fill(~_causal_mask(t, t, fq.device), 0.0)  # [B, H, T, T]
    numer = fq @ s0 + weights @ v
    denom = (fq * z0[:, :, None, :]).sum(-1, keepdim=True) + weights.sum(-1, keepdim=True) + eps
    return numer / denom, (s0 + fk.transpose(-1, -2) @ v, z0 + fk.sum(dim=2))


def linear_state_step(
    code: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, ...] | None,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run linear heads of kind ``code`` (elu, hedgehog, gdn) over a chunk of new tokens.

    q, k ``[B, H, T, D]``, v ``[B, H, T, Dv]``: the chunk (a prefill chunk or one decode
    token), one query per new token. ``state``: None at the start, else what the previous
    call returned, fp32 -- elu/hedgehog ``(S [B, H, F, Dv], z [B, H, F])`` with F = D (elu)
    or 2D (hedgehog); gdn ``(S [B, H, D, Dv],)``. ``params``: rows for these H heads, as in
    :func:`run_kind`. Returns ``(out [B, H, T, Dv] in q.dtype, new state)``; chained over
    a split sequence it equals the whole-sequence form. No fusion here.
    """
    _check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"linear_state_step needs one query per new token, got Tq={q.shape[2]}, Tk={k.shape[2]}")
    if code == ELU.code:
        out, new = _linear_step(elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), state, EPS)
        return out.to(q.dtype), new
    if code == HEDGEHOG.code:
        weight, bias = _param(params, "hedgehog_weight", code), _param(params, "hedgehog_bias", code)
        fq, fk = hedgehog_feature_map(q, weight, bias), hedgehog_feature_map(k, weight, bias)
        out, new = _linear_step(fq, fk, v.float(), state, EPS)
        return out.to(q.dtype), new
    if code == GDN.code:
        weight, bias = _param(params, "gdn_gate_weight", code), _param(params, "gdn_gate_bias", code)
        if state is not None and len(state) != 1:
            raise ValueError(f"gdn state must be a 1-tuple (S,), got {len(state)} tensors")
        out, s = gated_delta_rule(q, k, v, weight, bias, None if state is None else state[0])
        return out, (s,)
    raise ValueError(f"linear_state_step: head kind code {code!r} is not a linear kind with a state (elu, hedgehog, gdn)")


def causal_linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, norm: Tensor | None, eps: float = EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """Linear attention over a chunk of new tokens that continues from a saved state.

    q, k: ``[B, H, T, D]``, v: ``[B, H, T, Dv]`` (the chunk: prefill or one decode token);
    ``state`` ``[B, H, D, Dv]`` and ``norm`` ``[B, H, D]`` sum ``phi(k) v^T`` and ``phi(k)`` over
    all earlier tokens (fp32; ``None`` for none). Returns ``(out, state', norm')`` with the
    chunk included: ``out_t = phi(q_t) . (S0 + sum_{s<=t} phi(k_s) v_s^T) / (phi(q_t) . (z0 +
    sum_{s<=t} phi(k_s)) + eps)``, equal to :func:`causal_linear_attention` over the whole
    sequence. ``out`` is in ``q.dtype``. (The ``elu`` case of :func:`linear_state_step`.)
    """
    _check_qkv(q, k, v)
    saved = None if state is None else (state, norm if norm is not None else state.new_zeros(state.shape[:3]))
    out, (new_state, new_norm) = _linear_step(
        elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), saved, eps
    )
    return out.to(q.dtype), new_state, new_norm
