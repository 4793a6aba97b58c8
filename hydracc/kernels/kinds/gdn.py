"""The ``gdn`` kind (code 3): the gated delta rule (Gated DeltaNet) on L2-normalized q, k.

``S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``, ``o_t = S_t^T q_t``, with
``log a_t = -softplus(k_t . w_a + c_a)`` and ``b_t = sigmoid(k_t . w_b + c_b)`` from the head's
own raw (post-RoPE) key. Parameters: ``gdn_gate_weight [Hq, D, 2]``, ``gdn_gate_bias [Hq, 2]``;
starting values: zero weight, a decay bias matched to the head's mean attention distance.
Decode state per head: ``S [D, Dv]`` (fp32). The hybrid layer runs the chunked (WY) form,
exact up to fp32 rounding and fast enough to backpropagate through. Under ``torch.export``
(ONNX) the recurrence runs as a ``scan`` over tokens (ONNX ``Scan``): the chunked form's
triangular solve has no ONNX operator, and a scan keeps the sequence length dynamic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from hydracc.kernels.kinds.base import EPS, HeadKind, Shape, check_qkv, param

GDN_CHUNK = 64  # default chunk size of the chunked gated delta rule
PARAMS = ("gdn_gate_weight", "gdn_gate_bias")

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
    check_qkv(q, k, v)
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


def _gdn_scan_core(
    qn: Tensor, kn: Tensor, v: Tensor, log_alpha: Tensor, beta: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_gdn_recurrent_core` with the loop over tokens as a ``scan``, for ``torch.export``:
    its length follows the symbolic sequence length (ONNX ``Scan``), and the body is the
    recurrence itself in plain operators (the chunked form's triangular solve has no ONNX op)."""
    from torch._higher_order_ops.scan import scan

    def one_token(s: Tensor, xs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        q_t, k_t, v_t, a_t, b_t = xs  # [B, H, D], [B, H, D], [B, H, Dv], [B, H], [B, H]
        read = (k_t[..., None, :] @ s).squeeze(-2)  # k_t^T S_{t-1}
        a, b = a_t[..., None, None], b_t[..., None, None]
        s = a * (s - b * k_t[..., :, None] * read[..., None, :]) + b * k_t[..., :, None] * v_t[..., None, :]
        return s, (q_t[..., None, :] @ s).squeeze(-2)

    xs = (qn.movedim(2, 0), kn.movedim(2, 0), v.movedim(2, 0), log_alpha.exp().movedim(2, 0), beta.movedim(2, 0))
    state, outs = scan(one_token, state, xs)
    return outs.movedim(0, 2), state


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
    if isinstance(qn.shape[2], int) and qn.shape[2] == 1:  # one token (decode): the recurrence, 10 ops
        out, state = _gdn_recurrent_core(qn, kn, vf, log_alpha, beta, state)
    elif not torch.compiler.is_exporting():
        out, state = _gdn_chunked_core(qn, kn, vf, log_alpha, beta, state, chunk_size)
    else:  # an exported prefill: a scan over a symbolic number of tokens
        out, state = _gdn_scan_core(qn, kn, vf, log_alpha, beta, state)
    return out[:, :, out.shape[2] - q.shape[2] :].to(q.dtype), state



def _gates(params: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor]:
    return param(params, "gdn_gate_weight", "gdn"), param(params, "gdn_gate_bias", "gdn")


def forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, params: Mapping[str, Tensor] | None = None, sink: int = 0, window: int = 0
) -> Tensor:
    return gated_delta_rule(q, k, v, *_gates(params))[0]


def step(
    q: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, ...] | None, params: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    weight, bias = _gates(params)
    if state is not None and len(state) != 1:
        raise ValueError(f"gdn state must be a 1-tuple (S,), got {len(state)} tensors")
    out, s = gated_delta_rule(q, k, v, weight, bias, None if state is None else state[0])
    return out, (s,)


def state_shapes(b: int, h: int, d: int, dv: int) -> tuple[Shape, ...]:
    return ((b, h, d, dv),)


def param_shapes(h: int, d: int) -> dict[str, Shape]:
    return {"gdn_gate_weight": (h, d, 2), "gdn_gate_bias": (h, 2)}


def init_params(
    rows: dict[str, Tensor], h: int, d: int, *, scale: float, distance: float, generator: torch.Generator
) -> None:
    """Zero gate weights; the decay bias so that ``1 / (1 - alpha)`` is the head's mean distance + 1."""
    alpha = 1.0 - 1.0 / (float(distance) + 1.0)
    rows["gdn_gate_bias"][h, 0] = math.log(math.expm1(max(-math.log(max(alpha, 1e-6)), 1e-6)))


GDN = HeadKind(
    "gdn",
    3,
    linear=True,
    keeps_kv=False,
    description="gated delta rule (Gated DeltaNet) on L2-normalized q, k, with learned "
    "decay and write-strength gates computed from the key",
    learned=True,
    forward=forward,
    step=step,
    state_parts=("state",),
    state_shapes=state_shapes,
    params=PARAMS,
    param_shapes=param_shapes,
    init_params=init_params,
    symbol="g",
)
