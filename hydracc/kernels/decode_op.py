"""The ``hydracc::hybrid_decode`` custom op: one new token through a whole hybrid layer.

Design: decoding reads the hybrid cache's own tensors (``cache.HybridLayer``): the full heads'
keys/values, the streaming heads' window with absolute positions, and the linear heads'
fp32 states per kind, which the op updates in place (``mutates_args=("states",)``), so one
launch serves every head of the layer. ``decode_layout`` says which cache row belongs to which
head. CPU tensors run ``hybrid_decode_reference`` (plain torch, the kernels' reference); CUDA
tensors the Triton kernel (``triton_decode``, imported on first use), falling back to the
reference where triton is missing or the shapes are outside what the kernel takes. The fake
checks shapes only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hydracc.kernels.head_kinds import ELU, FULL, GDN, HEDGEHOG, STREAMING, kind_by_code
from hydracc.kernels.reference import (
    causal_softmax_attention,
    fuse_linear_output,
    linear_state_step,
    select_param_rows,
    streaming_attention,
    validate_hybrid_inputs,
)

DECODE_OP_NAME = "hydracc::hybrid_decode"
DECODE_OP_SCHEMA = (
    "(Tensor q, Tensor k_new, Tensor v_new, Tensor? keys, Tensor? values, Tensor(a!)[] states,"
    " Tensor? window_keys, Tensor? window_values, Tensor? window_pos, int[] head_kinds,"
    " float scale, Tensor[] head_params, int[] head_windows) -> Tensor"
)
STATE_PART_COUNT = {ELU.code: 2, HEDGEHOG.code: 2, GDN.code: 1}
"""Tensors per linear kind in ``hybrid_decode``'s ``states``: ``(S, z)`` or gdn's ``(S,)``."""


@dataclass(frozen=True)
class DecodeLayout:
    """Where ``hybrid_decode`` finds each head's cache, as ``cache.HybridLayer`` lays it out.

    ``cached_kv``: the KV heads held in ``keys``/``values`` (dim 1, in this order): those some
    full head reads. ``stream_kv``: the KV heads held in ``window_keys``/``window_values``.
    ``linear``: ``(code, query heads)`` per linear kind present, by code; ``states`` holds each
    kind's tensors in this order, row i of dim 1 belonging to the kind's i-th head.
    """

    group: int
    full: tuple[int, ...]
    streaming: tuple[int, ...]
    cached_kv: tuple[int, ...]
    stream_kv: tuple[int, ...]
    linear: tuple[tuple[int, tuple[int, ...]], ...]


@functools.lru_cache(maxsize=256)
def decode_layout(head_kinds: tuple[int, ...], num_heads: int, num_kv_heads: int) -> DecodeLayout:
    """The cache layout of a layer with these kinds (see :class:`DecodeLayout`)."""
    group = num_heads // num_kv_heads
    full = tuple(h for h, c in enumerate(head_kinds) if c == FULL.code)
    streaming = tuple(h for h, c in enumerate(head_kinds) if c == STREAMING.code)
    linear: dict[int, list[int]] = {}
    for h, c in enumerate(head_kinds):
        if kind_by_code(c).linear:
            linear.setdefault(c, []).append(h)
    return DecodeLayout(
        group,
        full,
        streaming,
        tuple(sorted({h // group for h in full})),
        tuple(sorted({h // group for h in streaming})),
        tuple((c, tuple(heads)) for c, heads in sorted(linear.items())),
    )


def validate_decode_inputs(
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
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
) -> DecodeLayout:
    """Shape checks of ``hybrid_decode`` (fake tensors work); returns the layout."""
    if q.dim() == 4 and k_new.dim() == 4 and (q.shape[2] != 1 or k_new.shape[2] != 1):
        raise ValueError(f"hybrid_decode takes one new token: got Tq={q.shape[2]}, new keys {k_new.shape[2]}")
    validate_hybrid_inputs(q, k_new, v_new, head_kinds, head_params, head_windows)
    b, hq, _, d = q.shape
    hkv, dv = k_new.shape[1], v_new.shape[-1]
    layout = decode_layout(tuple(int(c) for c in head_kinds), hq, hkv)

    def check_kv(name: str, kk: Tensor | None, vv: Tensor | None, heads: tuple[int, ...]) -> None:
        if not heads:
            return
        if kk is None or vv is None:
            raise ValueError(f"{name}: the layer has heads that need them, got None")
        n = len(heads)
        if kk.dim() != 4 or tuple(kk.shape[:2]) != (b, n) or kk.shape[3] != d or tuple(vv.shape[:3]) != tuple(kk.shape[:3]) or vv.shape[3] != dv or kk.shape[2] < 1:
            raise ValueError(
                f"{name} must be [B={b}, {n}, T, {d}] and [B, {n}, T, {dv}] (KV heads {list(heads)}, new token "
                f"included); got {tuple(kk.shape)}, {tuple(vv.shape)}"
            )

    check_kv("keys/values", keys, values, layout.cached_kv)
    check_kv("window_keys/window_values", window_keys, window_values, layout.stream_kv)
    if layout.stream_kv and (window_pos is None or window_keys is None or tuple(window_pos.shape) != (window_keys.shape[2],)):
        raise ValueError("window_pos must hold one absolute position per window row (the new token's last)")
    expected = []
    for code, heads in layout.linear:
        f = 2 * d if code == HEDGEHOG.code else d
        expected.append((b, len(heads), f, dv))
        if STATE_PART_COUNT[code] == 2:
            expected.append((b, len(heads), f))
    got = [tuple(s.shape) for s in states]
    if got != expected:
        raise ValueError(f"states must have shapes {expected} (by kind code: S [B, H, F, Dv], z [B, H, F]); got {got}")
    return layout


def hybrid_decode_reference(
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
    """``hybrid_decode`` in plain torch (the CPU implementation and the kernels' reference)."""
    layout = validate_decode_inputs(
        q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos,
        head_kinds, head_params, head_windows,
    )
    b, hq, _, _ = q.shape
    group = layout.group
    out = q.new_empty(b, hq, 1, v_new.shape[-1])
    dev = q.device
    if layout.full:
        slot = {kv: i for i, kv in enumerate(layout.cached_kv)}
        idx = torch.tensor(layout.full, device=dev)
        kv_of = torch.tensor([slot[h // group] for h in layout.full], device=dev)
        res = causal_softmax_attention(q.index_select(1, idx), keys.index_select(1, kv_of), values.index_select(1, kv_of), scale)
        out.index_copy_(1, idx, res.to(out.dtype))
    parts = iter(states)
    for code, heads in layout.linear:
        state = tuple(next(parts) for _ in range(STATE_PART_COUNT[code]))
        idx = torch.tensor(heads, device=dev)
        rows = select_param_rows(head_params, idx)
        res, new = linear_state_step(
            code, q.index_select(1, idx), k_new.index_select(1, idx // group), v_new.index_select(1, idx // group),
            state, rows or None,
        )
        for old, fresh in zip(state, new, strict=True):
            old.copy_(fresh)
        if rows:
            res = fuse_linear_output(res, rows["fusion_scale"])
        out.index_copy_(1, idx, res.to(out.dtype))
    if layout.streaming:
        slot = {kv: i for i, kv in enumerate(layout.stream_kv)}
        for h in layout.streaming:
            j = slot[h // group]
            res = streaming_attention(
                q[:, h : h + 1], window_keys[:, j : j + 1], window_values[:, j : j + 1], scale,
                int(head_windows[2 * h]), int(head_windows[2 * h + 1]), window_pos[-1:], window_pos,
            )
            out[:, h : h + 1] = res.to(out.dtype)
    return out


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
    return hybrid_decode_reference(
        q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos,
        head_kinds, scale, head_params, head_windows,
    )


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
    validate_decode_inputs(
        q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos,
        head_kinds, head_params, head_windows,
    )
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
    args = (q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos, head_kinds, scale, head_params, head_windows)
    try:
        from hydracc.kernels import triton_decode
    except ImportError:  # no triton on this machine
        return hybrid_decode_reference(*args)
    if not triton_decode.decode_supported(q, k_new, v_new, keys, values, states, window_keys, window_values):
        return hybrid_decode_reference(*args)
    return triton_decode.hybrid_decode_triton(*args)


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
    linear kind present, by code, ``S [B, H_kind, F, Dv]`` and ``z [B, H_kind, F]`` (elu F = D,
    hedgehog F = 2D) or gdn's ``S [B, H_kind, D, Dv]``, fp32, updated in place with the new
    token. Returns ``[B, Hq, 1, Dv]`` in ``q.dtype`` (linear heads fused when ``head_params``).
    """
    return torch.ops.hydracc.hybrid_decode(
        q, k_new, v_new, keys, values, list(states), window_keys, window_values, window_pos,
        [int(c) for c in head_kinds], float(scale), list(head_params), [int(w) for w in head_windows],
    )
