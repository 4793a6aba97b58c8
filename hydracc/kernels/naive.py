"""The hybrid layer in plain torch: the reference of both ops (``naive.py`` as in fla).

Design: a layer is heads grouped by kind (``head_groups``), each group running its kind's
hooks from :mod:`hydracc.kernels.kinds` (``forward`` over a whole sequence, ``step`` over new
tokens with a saved state), then scale-normalized fusion for linear heads when ``head_params``
is given. ``hybrid_attention_reference`` is the prefill op's reference (and its backward);
``hybrid_decode_reference`` the decode op's (its CPU implementation). Linear and streaming
heads over new tokens are one function, ``recurrent_heads``, run by the decode reference and
the hybrid cache's torch path; ``composed.py`` (the CPU prefill) runs ``run_kind`` as the
prefill reference does, with SDPA for softmax heads. Readability over speed: everything in fp32, cast back once; inputs may
be strided views; all of it is differentiable. When ``Tq < Tk`` the queries are the *last*
``Tq`` positions (causal mask aligned bottom-right).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from hydracc.kernels.kinds import EPS, FUSION_PARAM, PARAM_NAMES, STREAMING, kind_by_code
from hydracc.kernels.kinds.base import check_qkv
from hydracc.kernels.kinds.full import causal_softmax_attention
from hydracc.kernels.kinds.streaming import streaming_attention
from hydracc.kernels.layout import (
    DecodeLayout,
    DecodeTensors,
    split_states,
    take_heads,
    validate_decode_inputs,
    validate_hybrid_inputs,
)

# --- per kind ---------------------------------------------------------------------------------


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
    try:
        kind = kind_by_code(code)
    except KeyError:
        raise ValueError(f"unknown head kind code {code!r}") from None
    assert kind.forward is not None
    return kind.forward(q, k, v, scale, params, sink, window)


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
    call returned, fp32, shaped as the kind's ``state_shapes`` (elu/hedgehog ``(S [B, H, F,
    Dv], z [B, H, F])``, gdn ``(S [B, H, D, Dv],)``). ``params``: rows for these H heads, as in
    :func:`run_kind`. Returns ``(out [B, H, T, Dv] in q.dtype, new state)``; chained over a
    split sequence it equals the whole-sequence form. No fusion here.
    """
    check_qkv(q, k, v)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"linear_state_step needs one query per new token, got Tq={q.shape[2]}, Tk={k.shape[2]}")
    try:
        kind = kind_by_code(code)
    except KeyError:
        kind = None
    if kind is None or kind.step is None:
        raise ValueError(f"linear_state_step: head kind code {code!r} is not a linear kind with a state (elu, hedgehog, gdn)")
    return kind.step(q, k, v, state, params)


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


# --- grouping heads ---------------------------------------------------------------------------


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


def linear_group_step(
    code: int,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, ...] | None,
    rows: Mapping[str, Tensor] | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Linear heads of one kind over new tokens from ``state``, fused when ``rows`` (their
    ``head_params`` rows) are given: what decode and the hybrid cache run per kind."""
    step = kind_by_code(code).step  # (the callers laid the heads out by kind: only linear codes come here)
    assert step is not None
    out, new = step(q, k, v, state, rows or None)
    if rows:
        out = fuse_linear_output(out, rows[FUSION_PARAM])
    return out, new


def streaming_heads(
    out: Tensor,
    q: Tensor,
    window_keys: Tensor,
    window_values: Tensor,
    scale: float,
    heads: Sequence[int],
    stream_kv: Sequence[int],
    group: int,
    head_windows: Sequence[int],
    q_positions: Tensor,
    k_positions: Tensor,
) -> None:
    """Streaming heads ``heads`` over the window cache (row i: KV head ``stream_kv[i]``, at
    absolute positions ``k_positions``), written into ``out`` head by head."""
    slot = {kv: i for i, kv in enumerate(stream_kv)}
    for h in heads:
        j = slot[h // group]
        res = streaming_attention(
            q[:, h : h + 1], window_keys[:, j : j + 1], window_values[:, j : j + 1], scale,
            int(head_windows[2 * h]), int(head_windows[2 * h + 1]), q_positions, k_positions,
        )
        out[:, h : h + 1] = res.to(out.dtype)


@functools.lru_cache(maxsize=1024)
def _kv_heads(heads: tuple[int, ...], group: int) -> tuple[int, ...]:
    return tuple(h // group for h in heads)


def recurrent_heads(
    out: Tensor,
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    layout: DecodeLayout,
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
    states: Mapping[int, tuple[Tensor, ...] | None],
    window: tuple[Tensor, Tensor, Tensor] | Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None,
    index: Callable[[str, Sequence[int]], Tensor] | None = None,
) -> dict[int, tuple[Tensor, ...]]:
    """The linear and streaming heads of a layer over new tokens, continued from saved state.

    q ``[B, Hq, T, D]``, k_new/v_new ``[B, Hkv, T, *]``: the new tokens. ``states``: each linear
    kind's state by code (None: empty). ``window``: the streaming heads' keys, values and
    absolute positions, new rows included (the queries are the last T positions), or a function
    returning them, called after the linear heads (so the cache keeps its op order). Writes those
    heads of ``out``; returns each linear kind's new state. ``index(name, heads)`` makes the
    index tensors (the cache reuses its own). The decode op's reference and the hybrid cache's
    torch path both run this; full heads are theirs to run (the cache keeps SDPA).
    """
    if index is None:
        def index(name: str, heads: Sequence[int]) -> Tensor:
            return torch.tensor(heads, device=q.device)
    new: dict[int, tuple[Tensor, ...]] = {}
    for code, heads in layout.linear:
        idx = index(f"linear{code}", heads)
        kv_of = index(f"linear{code}_kv", _kv_heads(heads, layout.group))
        rows = select_param_rows(head_params, idx) if head_params else None
        res, new[code] = linear_group_step(
            code, take_heads(q, heads, lambda idx=idx: idx), k_new.index_select(1, kv_of), v_new.index_select(1, kv_of),
            states[code], rows,
        )
        out.index_copy_(1, idx, res if res.dtype == out.dtype else res.to(out.dtype))
    if layout.streaming:
        assert window is not None
        wk, wv, pos = window() if callable(window) else window
        streaming_heads(
            out, q, wk, wv, scale, layout.streaming, layout.stream_kv, layout.group, head_windows,
            pos[pos.shape[0] - q.shape[2] :], pos,
        )
    return new


# --- prefill: hydracc::hybrid_attention -----------------------------------------------------


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
    :mod:`hydracc.kernels.kinds`. ``scale`` applies to softmax heads (full, streaming).
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
            res = fuse_linear_output(res, rows[FUSION_PARAM])
        out = out.index_copy(1, q_idx, res)
    return out.to(q.dtype)


# --- decode: hydracc::hybrid_decode ----------------------------------------------------------


def decode_reference(
    t: DecodeTensors,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
) -> Tensor:
    """:func:`hybrid_decode_reference` on a :class:`~hydracc.kernels.layout.DecodeTensors`."""
    layout = validate_decode_inputs(t, head_kinds, head_params, head_windows)
    q = t.q
    b, hq, _, _ = q.shape
    group = layout.group
    out = q.new_empty(b, hq, 1, t.v_new.shape[-1])
    dev = q.device
    if layout.full:
        assert t.keys is not None and t.values is not None
        slot = {kv: i for i, kv in enumerate(layout.cached_kv)}
        idx = torch.tensor(layout.full, device=dev)
        kv_of = torch.tensor([slot[h // group] for h in layout.full], device=dev)
        res = causal_softmax_attention(q.index_select(1, idx), t.keys.index_select(1, kv_of), t.values.index_select(1, kv_of), scale)
        out.index_copy_(1, idx, res.to(out.dtype))
    states = split_states(layout, t.states)
    window = None
    if layout.streaming:
        assert t.window_keys is not None and t.window_values is not None and t.window_pos is not None
        window = (t.window_keys, t.window_values, t.window_pos)
    new = recurrent_heads(out, q, t.k_new, t.v_new, layout, scale, head_params, head_windows, states, window)
    for code, fresh in new.items():
        for old, value in zip(states[code], fresh, strict=True):
            old.copy_(value)
    return out


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
    tensors = DecodeTensors(q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos)
    return decode_reference(tensors, head_kinds, scale, head_params, head_windows)
