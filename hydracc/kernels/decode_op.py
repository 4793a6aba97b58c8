"""The ``hydracc::hybrid_decode`` custom op: one new token through a whole hybrid layer.

Design: decoding reads the hybrid cache's own tensors (``cache.HybridLayer``): the full heads'
keys/values, the streaming heads' window with absolute positions, and the linear heads'
fp32 states per kind, which the op updates in place (``mutates_args=("states",)``), so one
launch serves every head of the layer. ``layout.decode_layout`` says which cache row belongs
to which head. CPU tensors run ``naive.hybrid_decode_reference`` (plain torch, the kernels'
reference); CUDA tensors the Triton kernel (``triton_decode``, imported on first use),
falling back to the reference where triton is missing or the shapes are outside what the
kernel takes. The fake checks shapes only. Inside, the op's first nine arguments travel as
one ``layout.DecodeTensors``; the schema keeps them positional (it is in saved graphs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hydracc.kernels.layout import (
    STATE_PART_COUNT,
    DecodeLayout,
    DecodeTensors,
    decode_layout,
    validate_decode_inputs,
)
from hydracc.kernels.naive import decode_reference, hybrid_decode_reference

__all__ = [
    "DECODE_OP_NAME",
    "DECODE_OP_SCHEMA",
    "STATE_PART_COUNT",
    "DecodeLayout",
    "DecodeTensors",
    "decode_layout",
    "hybrid_decode",
    "hybrid_decode_op",
    "hybrid_decode_reference",
    "validate_decode_inputs",
]

DECODE_OP_NAME = "hydracc::hybrid_decode"
DECODE_OP_SCHEMA = (
    "(Tensor q, Tensor k_new, Tensor v_new, Tensor? keys, Tensor? values, Tensor(a!)[] states,"
    " Tensor? window_keys, Tensor? window_values, Tensor? window_pos, int[] head_kinds,"
    " float scale, Tensor[] head_params, int[] head_windows) -> Tensor"
)


@torch.library.custom_op(DECODE_OP_NAME, mutates_args=("states",), schema=DECODE_OP_SCHEMA)
def hybrid_decode_op(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    keys: Tensor | None,
    values: Tensor | None,
    states: Sequence[Tensor],
    window_keys: Tensor | None,
    window_values: Tensor | None,
    window_pos: Tensor | None,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
) -> Tensor:
    t = DecodeTensors(q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos)
    return decode_reference(t, head_kinds, scale, head_params, head_windows)


@hybrid_decode_op.register_fake
def _hybrid_decode_fake(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    keys: Tensor | None,
    values: Tensor | None,
    states: Sequence[Tensor],
    window_keys: Tensor | None,
    window_values: Tensor | None,
    window_pos: Tensor | None,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
) -> Tensor:
    t = DecodeTensors(q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos)
    validate_decode_inputs(t, head_kinds, head_params, head_windows)
    return q.new_empty(q.shape[0], q.shape[1], 1, v_new.shape[-1])


@hybrid_decode_op.register_kernel("cuda")
def _hybrid_decode_cuda(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    keys: Tensor | None,
    values: Tensor | None,
    states: Sequence[Tensor],
    window_keys: Tensor | None,
    window_values: Tensor | None,
    window_pos: Tensor | None,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
) -> Tensor:
    t = DecodeTensors(q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos)
    try:
        from hydracc.kernels import triton_decode
    except ImportError:  # no triton on this machine
        return decode_reference(t, head_kinds, scale, head_params, head_windows)
    if not triton_decode.decode_supported(t, head_kinds):
        return decode_reference(t, head_kinds, scale, head_params, head_windows)
    return triton_decode.decode_triton(t, head_kinds, scale, head_params, head_windows)


def hybrid_decode(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    keys: Tensor | None,
    values: Tensor | None,
    states: Sequence[Tensor],
    window_keys: Tensor | None,
    window_values: Tensor | None,
    window_pos: Tensor | None,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
) -> Tensor:
    """One decode step of a hybrid layer: ``torch.ops.hydracc.hybrid_decode``.

    q ``[B, Hq, 1, D]``; k_new, v_new ``[B, Hkv, 1, D|Dv]``: the new token's keys and values
    for every KV head (any strides). Caches, laid out as ``decode_layout`` says (the
    ``cache.HybridLayer`` layout), already holding the new token: ``keys``/``values``
    ``[B, len(cached_kv), T, D|Dv]`` for full heads; ``window_keys``/``window_values``
    ``[B, len(stream_kv), Tw, D|Dv]`` with ``window_pos`` ``[Tw]`` (absolute positions, the new
    token's last) for streaming heads; None where the layer has no such heads. ``states``: per
    linear kind present, by code, the kind's ``state_shapes`` tensors (elu/hedgehog ``S [B,
    H_kind, F, Dv]`` and ``z [B, H_kind, F]``, gdn ``S [B, H_kind, D, Dv]``), fp32, updated in
    place with the new token. Returns ``[B, Hq, 1, Dv]`` in ``q.dtype`` (linear heads fused
    when ``head_params``).
    """
    return torch.ops.hydracc.hybrid_decode(
        q, k_new, v_new, keys, values, list(states), window_keys, window_values, window_pos,
        [int(c) for c in head_kinds], float(scale), list(head_params), [int(w) for w in head_windows],
    )
