"""Layout types and input validation of the hybrid ops (a leaf: imports only the kind table).

Design: both ops, their references and their Triton implementations check their arguments
here, by shape only, so the fakes (meta tensors, symbolic shapes) run the same checks.
``DecodeLayout`` says which row of the hybrid cache's tensors belongs to which head;
``DecodeTensors`` carries the decode op's tensors as one named structure through the Python
side (the op's schema itself keeps its positional arguments).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from hydracc.kernels.kinds import (
    FULL,
    PARAM_NAMES,
    STATE_PART_COUNT,
    STATE_PARTS,
    STREAMING,
    HeadKind,
    kind_by_code,
    param_shapes,
    state_shapes,
)

__all__ = [
    "STATE_PARTS",
    "STATE_PART_COUNT",
    "DecodeLayout",
    "DecodeTensors",
    "decode_layout",
    "take_heads",
    "validate_decode_inputs",
    "validate_hybrid_inputs",
]


def validate_hybrid_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
) -> None:
    """Check the arguments of the hybrid layer; shapes only, so fake/meta tensors work.

    ``head_params``: empty, or exactly the tensors named by ``PARAM_NAMES`` with the shapes
    of ``param_shapes(Hq, D)`` (required when a head is of a learned kind).
    ``head_windows``: empty, or ``2 * Hq`` ints ``[sink_0, window_0, sink_1, ...]``
    (required when a head is ``streaming``, whose entries need sink >= 0, window >= 1).
    Raises ``ValueError`` naming the problem.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "hybrid attention expects q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, hq, tq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length"
        )
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} != {k.shape[3]}")
    hkv, tk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) "
            "for grouped-query attention"
        )
    if tq > tk:
        raise ValueError(f"more queries than keys: Tq={tq} > Tk={tk}")
    if len(head_kinds) != hq:
        raise ValueError(
            f"head_kinds has {len(head_kinds)} entries but q has {hq} heads (one code per query head)"
        )
    kinds = []
    for h, code in enumerate(head_kinds):
        try:
            kinds.append(kind_by_code(code))
        except KeyError as err:
            raise ValueError(f"head {h}: {err.args[0]}") from None
    _validate_head_params(kinds, head_params, hq, d)
    _validate_head_windows(kinds, head_windows, hq)
    if not (
        q.dtype.is_floating_point
        and k.dtype.is_floating_point
        and v.dtype.is_floating_point
    ):
        raise ValueError(
            f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def _validate_head_params(kinds: list[HeadKind], head_params: Sequence[Tensor], hq: int, d: int) -> None:
    names = ", ".join(PARAM_NAMES)
    if len(head_params) == 0:
        learned = [h for h, kind in enumerate(kinds) if kind.learned]
        if learned:
            h = learned[0]
            raise ValueError(
                f"head {h} is of the learned kind {kinds[h].name!r}, so head_params must hold the "
                f"{len(PARAM_NAMES)} tensors {names} (got none)"
            )
        return
    if len(head_params) != len(PARAM_NAMES):
        raise ValueError(
            f"head_params must be empty or hold exactly the {len(PARAM_NAMES)} tensors {names}, "
            f"in that order; got {len(head_params)} tensors"
        )
    for i, ((name, shape), tensor) in enumerate(zip(param_shapes(hq, d).items(), head_params, strict=True)):
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"head_params[{i}] ({name}) must have shape {list(shape)} for Hq={hq}, D={d}; "
                f"got {list(tensor.shape)}"
            )
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"head_params[{i}] ({name}) must be floating point, got {tensor.dtype}")


def _validate_head_windows(kinds: list[HeadKind], head_windows: Sequence[int], hq: int) -> None:
    streaming = [h for h, kind in enumerate(kinds) if kind.code == STREAMING.code]
    if len(head_windows) == 0:
        if streaming:
            raise ValueError(
                f"head {streaming[0]} is 'streaming', so head_windows must hold 2 * Hq = {2 * hq} ints "
                "[sink_0, window_0, sink_1, window_1, ...] (got none)"
            )
        return
    if len(head_windows) != 2 * hq:
        raise ValueError(
            f"head_windows must be empty or hold 2 * Hq = {2 * hq} ints [sink_0, window_0, ...]; "
            f"got {len(head_windows)}"
        )
    for h in streaming:
        sink, window = head_windows[2 * h], head_windows[2 * h + 1]
        if sink < 0 or window < 1:
            raise ValueError(
                f"head {h} ('streaming') needs sink >= 0 and window >= 1 in head_windows, "
                f"got sink={sink}, window={window}"
            )


# --- decode ---------------------------------------------------------------------------------


class DecodeTensors(NamedTuple):
    """The tensors of one ``hybrid_decode`` call, in the op's order (``DecodeTensors(*args[:9])``).

    q ``[B, Hq, 1, D]``; k_new, v_new ``[B, Hkv, 1, D|Dv]``; keys/values ``[B, len(cached_kv), T,
    D|Dv]`` (full heads) or None; states: per linear kind present, by code, its
    ``state_shapes`` tensors (fp32, updated in place); window_keys/window_values ``[B,
    len(stream_kv), Tw, D|Dv]`` and window_pos ``[Tw]`` (streaming heads) or None.
    """

    q: Tensor
    k_new: Tensor
    v_new: Tensor
    keys: Tensor | None
    values: Tensor | None
    states: Sequence[Tensor]
    window_keys: Tensor | None
    window_values: Tensor | None
    window_pos: Tensor | None


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


@functools.lru_cache(maxsize=1024)
def head_run(heads: tuple[int, ...]) -> int | None:
    """The first of ``heads`` when they are consecutive (a slice takes them), else None."""
    return heads[0] if heads and heads == tuple(range(heads[0], heads[0] + len(heads))) else None


def take_heads(t: Tensor, heads: tuple[int, ...], index: Callable[[], Tensor], dim: int = 1) -> Tensor:
    """``t``'s entries ``heads`` along ``dim``: a view when they are consecutive (decode steps are
    a few dozen tiny ops, and each copy saved counts), else ``index_select`` with ``index()``."""
    first = head_run(heads)
    if first is None:
        return t.index_select(dim, index())
    return t if first == 0 and len(heads) == t.shape[dim] else t.narrow(dim, first, len(heads))


def validate_decode_inputs(
    t: DecodeTensors, head_kinds: Sequence[int], head_params: Sequence[Tensor], head_windows: Sequence[int]
) -> DecodeLayout:
    """Shape checks of ``hybrid_decode`` (fake tensors work); returns the layout."""
    q, k_new, v_new = t.q, t.k_new, t.v_new
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

    check_kv("keys/values", t.keys, t.values, layout.cached_kv)
    check_kv("window_keys/window_values", t.window_keys, t.window_values, layout.stream_kv)
    if layout.stream_kv and (
        t.window_pos is None or t.window_keys is None or tuple(t.window_pos.shape) != (t.window_keys.shape[2],)
    ):
        raise ValueError("window_pos must hold one absolute position per window row (the new token's last)")
    expected = [shape for code, heads in layout.linear for shape in state_shapes(code, b, len(heads), d, dv)]
    got = [tuple(s.shape) for s in t.states]
    if got != expected:
        raise ValueError(f"states must have shapes {expected} (by kind code: S [B, H, F, Dv], z [B, H, F]); got {got}")
    return layout


def split_states(layout: DecodeLayout, states: Sequence[Tensor]) -> dict[int, tuple[Tensor, ...]]:
    """``states`` (the decode op's flat list) by linear kind code, each kind's tensors in order."""
    parts = iter(states)
    return {code: tuple(next(parts) for _ in range(STATE_PART_COUNT[code])) for code, _ in layout.linear}
