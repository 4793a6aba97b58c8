"""The registry of per-head attention kinds: ``HEAD_KINDS``, one module per kind.

Design: a head kind is one frozen ``HeadKind`` row (``base.py``), defined in its own module
(``full.py``, ``elu.py``, ``hedgehog.py``, ``gdn.py``, ``streaming.py``) with everything that
kind is: its reference forward, its recurrent step and decode-state shapes (linear kinds), its
``head_params`` tensors, their shapes and starting values (learned kinds). Plans, graph
passes and kernels refer to a kind by its ``name`` (in JSON) or its small integer ``code`` (in
the op's ``int[] head_kinds``, and as ``tl.constexpr`` values in the Triton kernels). Codes
are part of the saved-checkpoint format: never renumber a row, only append new ones. Adding a
kind: one module here, a row in ``HEAD_KINDS``, its Triton branches (or a torch fallback) and
tests; ``tests/kernel_ops/test_kind_table.py`` checks that each row provides every hook.

Per-head tensors: a layer's learned parameters travel in the op's ``Tensor[] head_params`` as
exactly the tensors named by ``PARAM_NAMES``, in that order, each indexed by *query head* (row
h belongs to query head h; rows of heads of other kinds are ignored). One fixed layout for
every layer keeps the op schema, checkpoints and graph passes free of per-kind bookkeeping, at
the cost of a few unused rows. ``fusion_scale`` belongs to every linear head (see
``naive.fuse_linear_output``); the others to one learned kind each, in the order of the
kinds' codes (a new kind appends its names). Per-head integer settings of the ``streaming``
kind (``sink``, ``window``) travel in the op's ``int[] head_windows`` instead.
"""

from __future__ import annotations

from hydracc.kernels.kinds.base import EPS, HeadKind
from hydracc.kernels.kinds.elu import ELU
from hydracc.kernels.kinds.full import FULL
from hydracc.kernels.kinds.gdn import GDN
from hydracc.kernels.kinds.hedgehog import HEDGEHOG
from hydracc.kernels.kinds.streaming import STREAMING

HEAD_KINDS: tuple[HeadKind, ...] = (FULL, ELU, HEDGEHOG, GDN, STREAMING)
KIND_NAMES: tuple[str, ...] = tuple(kind.name for kind in HEAD_KINDS)

_BY_NAME = {kind.name: kind for kind in HEAD_KINDS}
_BY_CODE = {kind.code: kind for kind in HEAD_KINDS}
if len(_BY_NAME) != len(HEAD_KINDS) or len(_BY_CODE) != len(HEAD_KINDS):
    raise RuntimeError("hydracc.kernels.kinds: duplicate head kind name or code")


def kind_by_name(name: str) -> HeadKind:
    """Return the head kind called ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(
            f"unknown head kind {name!r}; known kinds: {', '.join(KIND_NAMES)}"
        ) from None


def kind_by_code(code: int) -> HeadKind:
    """Return the head kind with integer ``code``; ``KeyError`` listing the known codes otherwise."""
    try:
        return _BY_CODE[code]
    except KeyError:
        known = ", ".join(f"{kind.code} ({kind.name})" for kind in HEAD_KINDS)
        raise KeyError(
            f"unknown head kind code {code!r}; known codes: {known}"
        ) from None


FUSION_PARAM = "fusion_scale"
"""The one ``head_params`` tensor shared by every linear kind: ``[Hq]``, the fusion scale."""

# The op's ``head_params``, in this order (the layout is part of the checkpoint format).
PARAM_NAMES: tuple[str, ...] = (FUSION_PARAM,) + tuple(
    name for kind in sorted(HEAD_KINDS, key=lambda k: k.code) for name in kind.params
)


def param_shapes(num_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """The shape of each ``head_params`` tensor for a layer of ``num_heads`` query heads.

    ``head_dim`` is the query/key head dim D. Keys are ``PARAM_NAMES``, in order.
    """
    shapes: dict[str, tuple[int, ...]] = {FUSION_PARAM: (num_heads,)}
    for kind in sorted(HEAD_KINDS, key=lambda k: k.code):
        if kind.param_shapes is not None:
            shapes.update(kind.param_shapes(num_heads, head_dim))
    return {name: shapes[name] for name in PARAM_NAMES}


def state_shapes(code: int, batch: int, heads: int, head_dim: int, value_dim: int) -> tuple[tuple[int, ...], ...]:
    """The decode-state tensors of ``heads`` heads of linear kind ``code`` (``HeadKind.state_shapes``)."""
    kind = kind_by_code(code)
    if kind.state_shapes is None:
        raise ValueError(f"head kind {kind.name!r} has no linear state")
    return kind.state_shapes(batch, heads, head_dim, value_dim)


STATE_PARTS: dict[int, tuple[str, ...]] = {kind.code: kind.state_parts for kind in HEAD_KINDS if kind.linear}
"""The names of each linear kind's state tensors, by code: ``(state, norm)`` or gdn's ``(state,)``."""
STATE_PART_COUNT: dict[int, int] = {code: len(parts) for code, parts in STATE_PARTS.items()}
"""Tensors per linear kind in ``hybrid_decode``'s ``states``."""

__all__ = [
    "ELU",
    "EPS",
    "FULL",
    "FUSION_PARAM",
    "GDN",
    "HEAD_KINDS",
    "HEDGEHOG",
    "KIND_NAMES",
    "PARAM_NAMES",
    "STATE_PARTS",
    "STATE_PART_COUNT",
    "STREAMING",
    "HeadKind",
    "kind_by_code",
    "kind_by_name",
    "param_shapes",
    "state_shapes",
]
