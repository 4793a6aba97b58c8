"""The registry of per-head attention kinds.

Design: a head kind is plain data (a frozen ``HeadKind`` row) in one table,
``HEAD_KINDS``. Plans, graph passes and kernels refer to a kind by its ``name``
(in JSON) or its small integer ``code`` (in the ``hydracc::hybrid_attention`` op's
``int[] head_kinds`` argument). Codes are part of the saved-checkpoint format: never
renumber a row, only append new ones (learned kinds such as hedgehog, gdn and
streaming will be added as rows, with their per-head parameters described there).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadKind:
    """One kind of attention head.

    ``linear``: the head runs a linear-attention recurrence (fixed-size state).
    ``keeps_kv``: the head needs the full key/value cache at decode time.
    ``plan_params``: names of the per-head settings a plan may give this kind
    (``{"kind": ..., "params": {...}}``); anything else is rejected.
    """

    name: str
    code: int
    linear: bool
    keeps_kv: bool
    description: str
    plan_params: tuple[str, ...] = ()


FULL = HeadKind(
    "full",
    0,
    linear=False,
    keeps_kv=True,
    description="causal softmax attention over all keys (the original head, unchanged)",
)
ELU = HeadKind(
    "elu",
    1,
    linear=True,
    keeps_kv=False,
    description="parameter-free normalized causal linear attention, feature map elu(x) + 1",
)

HEAD_KINDS: tuple[HeadKind, ...] = (FULL, ELU)
KIND_NAMES: tuple[str, ...] = tuple(kind.name for kind in HEAD_KINDS)

_BY_NAME = {kind.name: kind for kind in HEAD_KINDS}
_BY_CODE = {kind.code: kind for kind in HEAD_KINDS}
if len(_BY_NAME) != len(HEAD_KINDS) or len(_BY_CODE) != len(HEAD_KINDS):
    raise RuntimeError("hydracc.kernels.head_kinds: duplicate head kind name or code")


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
