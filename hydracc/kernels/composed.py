"""The hybrid op's portable implementation: SDPA for softmax heads, torch forms for the rest.

Design: until a fused kernel exists for a device, the op runs full heads through
``torch.nn.functional.scaled_dot_product_attention`` in the input dtype (exactly what the
original model ran, so an all-full layer gives bit-identical outputs), streaming heads
through SDPA with a boolean sink+window mask (also in the input dtype), and linear heads
(elu, hedgehog, gdn) through their kinds' ``forward`` hooks (``naive.run_kind``; gdn: the
chunked form), followed by scale-normalized fusion when ``head_params`` is given. Heads of one kind (and,
for streaming, one ``(sink, window)``) are gathered with ``index_select`` and scattered
back; the Triton kernels replace this gather/scatter composition. Tests compare it with
``naive.hybrid_attention_reference``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hydracc.kernels.kinds import FULL, FUSION_PARAM, STREAMING, kind_by_code
from hydracc.kernels.kinds.streaming import streaming_mask
from hydracc.kernels.layout import validate_hybrid_inputs
from hydracc.kernels.naive import fuse_linear_output, head_groups, run_kind, select_param_rows


def _full_heads(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _streaming_heads(q: Tensor, k: Tensor, v: Tensor, scale: float, sink: int, window: int) -> Tensor:
    # Bottom-right aligned: every query sees at least its own key, so no row is fully masked.
    tq, tk = q.shape[2], k.shape[2]
    k_pos = torch.arange(tk, device=q.device)
    mask = streaming_mask(k_pos[tk - tq :], k_pos, sink, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def hybrid_attention_composed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Same contract as ``hybrid_attention_reference``; writes every head of ``out``
    (a fresh ``[B, Hq, Tq, Dv]`` tensor unless given) and returns it."""
    validate_hybrid_inputs(q, k, v, head_kinds, head_params, head_windows)
    b, hq, tq, _ = q.shape
    group = hq // k.shape[1]
    if out is None:
        out = q.new_empty(b, hq, tq, v.shape[-1])
    for code, sink, window, q_idx, kv_idx in head_groups(head_kinds, group, q.device, head_windows):
        qs, ks, vs = q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx)
        if code == FULL.code:
            res = _full_heads(qs, ks, vs, scale)
        elif code == STREAMING.code:
            res = _streaming_heads(qs, ks, vs, scale, sink, window)
        else:
            rows = select_param_rows(head_params, q_idx)
            res = run_kind(code, qs.float(), ks.float(), vs.float(), scale, rows)
            if rows and kind_by_code(code).linear:
                res = fuse_linear_output(res, rows[FUSION_PARAM])
        out.index_copy_(1, q_idx, res.to(out.dtype))
    return out
