"""The hybrid op's portable implementation: SDPA for full heads, torch linear attention for the rest.

Design: until a fused kernel exists for a device, the op runs full heads through
``torch.nn.functional.scaled_dot_product_attention`` in the input dtype (exactly what the
original model ran, so an all-full layer gives bit-identical outputs) and linear heads
through the fp32 parallel form from ``reference``. Heads of one kind are gathered with
``index_select`` and scattered back; the Triton kernels replace this gather/scatter
composition. Tests compare it with ``hybrid_attention_reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hydracc.kernels.head_kinds import ELU, FULL
from hydracc.kernels.reference import causal_linear_attention, heads_by_kind, validate_hybrid_inputs


def _full_heads(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _elu_heads(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return causal_linear_attention(q, k, v)


_RUN = {FULL.code: _full_heads, ELU.code: _elu_heads}


def hybrid_attention_composed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Same contract as ``hybrid_attention_reference``; writes every head of ``out``
    (a fresh ``[B, Hq, Tq, Dv]`` tensor unless given) and returns it."""
    validate_hybrid_inputs(q, k, v, head_kinds, head_params)
    b, hq, tq, _ = q.shape
    group = hq // k.shape[1]
    if out is None:
        out = q.new_empty(b, hq, tq, v.shape[-1])
    for code, q_idx, kv_idx in heads_by_kind(head_kinds, group, q.device):
        res = _RUN[code](q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx), scale)
        out.index_copy_(1, q_idx, res.to(out.dtype))
    return out
