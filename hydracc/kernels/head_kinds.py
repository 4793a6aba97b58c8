"""The registry of per-head attention kinds.

Design: a head kind is plain data (a frozen ``HeadKind`` row) in one table,
``HEAD_KINDS``. Plans, graph passes and kernels refer to a kind by its ``name``
(in JSON) or its small integer ``code`` (in the ``hydracc::hybrid_attention`` op's
``int[] head_kinds`` argument). Codes are part of the saved-checkpoint format: never
renumber a row, only append new ones.

Per-head tensors: a layer's learned parameters travel in the op's ``Tensor[] head_params``
as exactly the tensors named by ``PARAM_NAMES``, in that order, each indexed by *query
head* (row h belongs to query head h; rows of heads of other kinds are ignored). One
fixed layout for every layer keeps the op schema, checkpoints and graph passes free of
per-kind bookkeeping, at the cost of a few unused rows. ``fusion_scale`` belongs to every
linear head (see ``reference.fuse_linear_output``); the others to one learned kind each.
Per-head integer settings of the ``streaming`` kind (``sink``, ``window``) travel in the
op's ``int[] head_windows`` instead, since they are not trained.
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
    ``learned``: the head needs trained tensors from ``head_params`` (see ``PARAM_NAMES``).
    """

    name: str
    code: int
    linear: bool
    keeps_kv: bool
    description: str
    plan_params: tuple[str, ...] = ()
    learned: bool = False


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

HEDGEHOG = HeadKind(
    "hedgehog",
    2,
    linear=True,
    keeps_kv=False,
    description="normalized causal linear attention with a learned feature map "
    "[softmax(xW + b), softmax(-(xW + b))] (Hedgehog / LoLCATs)",
    learned=True,
)
GDN = HeadKind(
    "gdn",
    3,
    linear=True,
    keeps_kv=False,
    description="gated delta rule (Gated DeltaNet) on L2-normalized q, k, with learned "
    "decay and write-strength gates computed from the key",
    learned=True,
)
STREAMING = HeadKind(
    "streaming",
    4,
    linear=False,
    keeps_kv=False,
    description="causal softmax attention over the first `sink` and the last `window` "
    "positions only (DuoAttention's streaming head; bounded cache)",
    plan_params=("sink", "window"),
)

HEAD_KINDS: tuple[HeadKind, ...] = (FULL, ELU, HEDGEHOG, GDN, STREAMING)
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


# The op's ``head_params``, in this order (the layout is part of the checkpoint format).
PARAM_NAMES: tuple[str, ...] = (
    "fusion_scale",
    "hedgehog_weight",
    "hedgehog_bias",
    "gdn_gate_weight",
    "gdn_gate_bias",
)


def param_shapes(num_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """The shape of each ``head_params`` tensor for a layer of ``num_heads`` query heads.

    ``head_dim`` is the query/key head dim D. Keys are ``PARAM_NAMES``, in order.
    """
    h, d = num_heads, head_dim
    return {
        "fusion_scale": (h,),
        "hedgehog_weight": (h, d, d),
        "hedgehog_bias": (h, d),
        "gdn_gate_weight": (h, d, 2),
        "gdn_gate_bias": (h, 2),
    }
