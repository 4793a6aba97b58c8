"""What every head kind provides (``HeadKind``) and the torch pieces several kinds share.

Design: a kind is one frozen ``HeadKind`` row, defined in its own module (``full.py``,
``elu.py`` ...) together with the functions its row points at: the reference forward the
hybrid layer runs, and for linear kinds the recurrent step the decode cache runs, the shapes
of the decode state, and the kind's own ``head_params`` with their shapes and starting
values. Shapes are ``[B, H, T, D]``; everything is computed in float32 and cast back once.
This module imports nothing from the rest of hydracc.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

EPS = 1e-6  # linear-attention denominator, L2 normalization and fusion RMS
MAX_WINDOW = 2**31 - 1
"""Largest plan setting (sink, window): positions are int32 in the kernels, and no model is longer."""

Shape = tuple[int, ...]
Forward = Callable[..., Tensor]
"""``forward(q, k, v, scale, params, sink, window) -> out``: q, k, v per query head (GQA
expanded), ``params`` the kind's ``PARAM_NAMES`` rows for these heads; no fusion."""
Step = Callable[..., tuple[Tensor, tuple[Tensor, ...]]]
"""``step(q, k, v, state, params) -> (out, new state)`` over a chunk of new tokens (Tq == Tk);
``state`` None at the start; fp32 state tensors."""
StateShapes = Callable[[int, int, int, int], tuple[Shape, ...]]
"""``state_shapes(B, H, D, Dv)``: the decode state's tensors, in ``state_parts`` order."""
ParamShapes = Callable[[int, int], dict[str, Shape]]
"""``param_shapes(Hq, D)``: the kind's own ``head_params`` tensors (rows by query head)."""
InitParams = Callable[..., None]
"""``init_params(rows, h, d, *, scale, distance, generator)``: write head ``h``'s starting values
into the zero-filled ``rows`` (``{name: [Hq, ...]}``); ``distance`` is the head's mean
attention distance, ``generator`` a seeded ``torch.Generator`` for this head."""


@dataclass(frozen=True)
class HeadKind:
    """One kind of attention head.

    ``linear``: the head runs a linear-attention recurrence (fixed-size state).
    ``keeps_kv``: the head needs the full key/value cache at decode time.
    ``plan_params``: names of the per-head settings a plan may give this kind
    (``{"kind": ..., "params": {...}}``); anything else is rejected.
    ``plan_defaults`` / ``plan_ranges``: each plan setting's value when a plan omits it and its
    inclusive integer range (plan settings travel in the op's ``head_windows``).
    ``learned``: the head needs trained tensors from ``head_params`` (see ``PARAM_NAMES``).
    ``symbol``: its one character in plan tables.

    Hooks (see the type aliases above): ``forward`` (every kind); ``step``, ``state_parts``
    and ``state_shapes`` (linear kinds: the decode state); ``params``, ``param_shapes`` and
    ``init_params`` (learned kinds: their ``head_params`` tensors).
    """

    name: str
    code: int
    linear: bool
    keeps_kv: bool
    description: str
    plan_params: tuple[str, ...] = ()
    plan_defaults: Mapping[str, int] = field(default_factory=dict, compare=False)
    plan_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict, compare=False)
    symbol: str = "?"
    learned: bool = False
    forward: Forward | None = field(default=None, compare=False, repr=False)
    step: Step | None = field(default=None, compare=False, repr=False)
    state_parts: tuple[str, ...] = ()
    state_shapes: StateShapes | None = field(default=None, compare=False, repr=False)
    params: tuple[str, ...] = ()
    param_shapes: ParamShapes | None = field(default=None, compare=False, repr=False)
    init_params: InitParams | None = field(default=None, compare=False, repr=False)

    @property
    def windowed(self) -> bool:
        """The head's plan settings travel in the op's ``head_windows`` (a bounded cache of keys)."""
        return bool(self.plan_params)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Same-head-count checks for the per-kind functions."""
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


def causal_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """``[Tq, Tk]`` bool, True where query i (at position Tk - Tq + i) may see key j."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def param(params: Mapping[str, Tensor] | None, name: str, kind: str) -> Tensor:
    """``params[name]``, or a ``ValueError`` saying that kind ``kind`` needs it."""
    if params is None or name not in params:
        raise ValueError(f"head kind {kind!r} needs the parameter {name!r}")
    return params[name]


# --- normalized linear attention on feature-mapped q, k (elu, hedgehog) -------------------


def linear_parallel(fq: Tensor, fk: Tensor, v: Tensor, eps: float) -> Tensor:
    """Normalized causal linear attention on feature-mapped q, k (fp32, bottom-right)."""
    tq, tk = fq.shape[2], fk.shape[2]
    weights = fq @ fk.transpose(-1, -2)  # [B, H, Tq, Tk], all >= 0
    weights = weights.masked_fill(~causal_mask(tq, tk, fq.device), 0.0)
    numer = weights @ v  # phi(q_t) . S_t
    denom = weights.sum(dim=-1, keepdim=True) + eps  # phi(q_t) . z_t + eps
    return numer / denom


def linear_recurrent(fq: Tensor, fk: Tensor, v: Tensor, eps: float) -> Tensor:
    """The same as :func:`linear_parallel`, one key at a time with explicit state ``S``, ``z``."""
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


def linear_step(
    fq: Tensor, fk: Tensor, v: Tensor, state: tuple[Tensor, ...] | None, eps: float
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """:func:`linear_parallel` over a chunk of new tokens, continued from ``(S, z)`` (or zeros)."""
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
        if t == 1:  # one new token (decode): update the state, then read it; 6 small ops instead of 12
            s = torch.addcmul(s0, fk.transpose(-1, -2), v)  # (a broadcast product: far cheaper than a tiny matmul)
            z = z0 + fk[:, :, 0]
            denom = torch.linalg.vecdot(fq[:, :, 0], z)[..., None, None] + eps
            return (fq @ s) / denom, (s, z)
    weights = (fq @ fk.transpose(-1, -2)).masked_fill(~causal_mask(t, t, fq.device), 0.0)  # [B, H, T, T]
    numer = fq @ s0 + weights @ v
    denom = (fq * z0[:, :, None, :]).sum(-1, keepdim=True) + weights.sum(-1, keepdim=True) + eps
    return numer / denom, (s0 + fk.transpose(-1, -2) @ v, z0 + fk.sum(dim=2))
