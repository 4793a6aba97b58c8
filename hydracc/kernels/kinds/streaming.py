"""The ``streaming`` kind (code 4): causal softmax over the first ``sink`` and last ``window``
keys (DuoAttention's streaming head).

Decode state: the window cache (first ``sink`` and last ``window`` rows with their absolute
positions); settings ``sink``, ``window`` travel in the op's ``head_windows``, not trained.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from hydracc.kernels.kinds.base import MAX_WINDOW, HeadKind, check_qkv


def streaming_mask(q_positions: Tensor, k_positions: Tensor, sink: int, window: int) -> Tensor:
    """``[Tq, Tk]`` bool: query at position p sees key j iff ``j <= p`` and
    (``j < sink`` or ``j > p - window``)."""
    p, j = q_positions[:, None], k_positions[None, :]
    return (j <= p) & ((j < sink) | (j > p - window))


def check_window(sink: int, window: int) -> None:
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
    check_window(sink, window)
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
    last ``Tq`` of them (bottom-right, as ``full.causal_softmax_attention``)."""
    check_qkv(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    k_pos = torch.arange(tk, device=q.device)
    return streaming_attention(q, k, v, scale, sink, window, k_pos[tk - tq :], k_pos)


def forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, params: Mapping[str, Tensor] | None = None, sink: int = 0, window: int = 0
) -> Tensor:
    return causal_streaming_attention(q, k, v, scale, sink, window)


STREAMING = HeadKind(
    "streaming",
    4,
    linear=False,
    keeps_kv=False,
    description="causal softmax attention over the first `sink` and the last `window` "
    "positions only (DuoAttention's streaming head; bounded cache)",
    plan_params=("sink", "window"),
    plan_defaults={"sink": 4, "window": 64},
    plan_ranges={"sink": (0, MAX_WINDOW), "window": (1, MAX_WINDOW)},
    symbol="s",
    forward=forward,
)
