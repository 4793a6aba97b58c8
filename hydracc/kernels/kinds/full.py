"""The ``full`` kind (code 0): causal softmax over every key, the original head unchanged.

Decode state: the KV cache (``keeps_kv``); no parameters.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from hydracc.kernels.kinds.base import HeadKind, causal_mask, check_qkv


def causal_softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal softmax attention.

    q: ``[B, H, Tq, D]``, k: ``[B, H, Tk, D]``, v: ``[B, H, Tk, Dv]``, ``Tq <= Tk``
    (caller expands GQA heads). Returns ``[B, H, Tq, Dv]`` in ``q.dtype``.
    """
    check_qkv(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    scores = scores.masked_fill(~causal_mask(tq, tk, q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, params: Mapping[str, Tensor] | None = None, sink: int = 0, window: int = 0
) -> Tensor:
    return causal_softmax_attention(q, k, v, scale)


FULL = HeadKind(
    "full",
    0,
    linear=False,
    keeps_kv=True,
    description="causal softmax attention over all keys (the original head, unchanged)",
    forward=forward,
    symbol="F",
)
