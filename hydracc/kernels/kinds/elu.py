"""The ``elu`` kind (code 1): parameter-free normalized causal linear attention, ``phi = elu + 1``.

``out_t = phi(q_t) . S_t / (phi(q_t) . z_t + eps)`` with ``S_t = sum_{s<=t} phi(k_s) v_s^T``,
``z_t = sum_{s<=t} phi(k_s)``. Decode state per head: ``S [D, Dv]``, ``z [D]`` (fp32).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from hydracc.kernels.kinds.base import EPS, HeadKind, Shape, check_qkv, linear_parallel, linear_recurrent, linear_step


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1, positive everywhere (the ``elu`` head kind's feature map)."""
    return F.elu(x) + 1.0


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """Normalized causal linear attention, parallel (quadratic, masked) form.

    ``out_t = phi(q_t) . S_t / (phi(q_t) . z_t + eps)`` with
    ``S_t = sum_{s<=t} phi(k_s) v_s^T`` and ``z_t = sum_{s<=t} phi(k_s)``.
    Shapes as in ``full.causal_softmax_attention`` (query i sits at position Tk - Tq + i).
    """
    check_qkv(q, k, v)
    out = linear_parallel(elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), eps)
    return out.to(q.dtype)


def causal_linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """The same as :func:`causal_linear_attention`, one key at a time with explicit state.

    State per head: ``S`` ``[D, Dv]`` and ``z`` ``[D]``. This is the readable definition
    (and what decode does); it is slow, use it for tests.
    """
    check_qkv(q, k, v)
    out = linear_recurrent(elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), eps)
    return out.to(q.dtype)


def causal_linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, norm: Tensor | None, eps: float = EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """Linear attention over a chunk of new tokens that continues from a saved state.

    q, k: ``[B, H, T, D]``, v: ``[B, H, T, Dv]`` (the chunk: prefill or one decode token);
    ``state`` ``[B, H, D, Dv]`` and ``norm`` ``[B, H, D]`` sum ``phi(k) v^T`` and ``phi(k)`` over
    all earlier tokens (fp32; ``None`` for none). Returns ``(out, state', norm')`` with the
    chunk included: ``out_t = phi(q_t) . (S0 + sum_{s<=t} phi(k_s) v_s^T) / (phi(q_t) . (z0 +
    sum_{s<=t} phi(k_s)) + eps)``, equal to :func:`causal_linear_attention` over the whole
    sequence. ``out`` is in ``q.dtype``. (The ``elu`` kind's :func:`step`.)
    """
    check_qkv(q, k, v)
    saved = None if state is None else (state, norm if norm is not None else state.new_zeros(state.shape[:3]))
    out, (new_state, new_norm) = linear_step(
        elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), saved, eps
    )
    return out.to(q.dtype), new_state, new_norm


def forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, params: Mapping[str, Tensor] | None = None, sink: int = 0, window: int = 0
) -> Tensor:
    return causal_linear_attention(q, k, v)


def step(
    q: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, ...] | None, params: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    out, new = linear_step(elu_feature_map(q.float()), elu_feature_map(k.float()), v.float(), state, EPS)
    return (out if out.dtype == q.dtype else out.to(q.dtype)), new


def state_shapes(b: int, h: int, d: int, dv: int) -> tuple[Shape, ...]:
    return (b, h, d, dv), (b, h, d)


ELU = HeadKind(
    "elu",
    1,
    linear=True,
    keeps_kv=False,
    description="parameter-free normalized causal linear attention, feature map elu(x) + 1",
    forward=forward,
    step=step,
    state_parts=("state", "norm"),
    state_shapes=state_shapes,
    symbol="e",
)
