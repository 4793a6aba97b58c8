"""Typed views of the attention calls in a captured graph: read and edit them without ``node.args``.

A converted layer is one call of ``hydracc::hybrid_attention(q, k, v, head_kinds, scale,
head_params, head_windows)``. Passes (built-in and user) read and edit that call through
``HybridCall``, never through ``node.args[i]``: the view is the one place that knows
argument positions, so a schema change is made here once instead of in every pass.

Reading::

    for call in ctx.hybrid_calls():          # or hybrid_calls(graph_module), in layer order
        call.layer, call.kinds, call.codes   # 3, ["full", "elu", ...], [0, 1, ...]
        call.num_heads, call.num_kv_heads, call.group_size, call.kv_head(h)
        call.windows                         # per head (sink, window) for streaming heads, else None
        call.param_nodes                     # {"fusion_scale": <get_attr node>, ...} or {}
        call.head_order                      # original head index per position (permute-heads)

Writing (validated: one entry per query head, known kinds, windows for streaming heads,
learned parameters for learned kinds; a ``PassError`` names the layer and the problem)::

    call.set_kinds(["full"] * call.num_heads)          # names, codes or HeadKind rows
    call.set_kinds(kinds, windows=[(4, 64), None, ...])  # kinds and windows together
    call.set_windows(None)                               # drop windows (no streaming heads left)
    call.reorder_heads(order)                            # kinds, windows and head_order

Design decisions:
- The view holds only the node; every property reads ``node.args`` live, so a pass that
  still edits ``node.args`` positionally (the schema is unchanged) and one using the view
  see the same call, and mixing them is safe.
- Writes store plain Python lists, exactly as ``hybridize`` creates them, so graphs (and
  the checkpoints emitted from them) do not depend on which API made an edit.
- ``PassManager`` calls ``check`` on every call after every pass and names the pass that
  left one inconsistent.
- ``SdpaCall`` is the same idea for the SDPA nodes ``fold-gqa`` and ``hybridize`` read
  (before the rewrite a site is an ``aten.scaled_dot_product_attention`` node).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx

import hydracc.kernels  # noqa: F401  (registers hydracc::hybrid_attention)
from hydracc.errors import PassError
from hydracc.frontend.capture import SDPA, SITE_META
from hydracc.kernels.kinds import PARAM_NAMES, STREAMING, HeadKind, kind_by_code, kind_by_name

HYBRID_OP = torch.ops.hydracc.hybrid_attention.default
HEAD_ORDER_META = "hydracc_head_order"
"""``node.meta`` key: the original index of the head at each position (set by ``permute-heads``)."""

# The op's argument positions (schema in hydracc/kernels/hybrid_op.py); only this module uses them.
_Q, _K, _V, _KINDS, _SCALE, _PARAMS, _WINDOWS = range(7)
_ARG_NAMES = ("q", "k", "v", "head_kinds", "scale", "head_params", "head_windows")

_VIEW_HINT = "read and edit hybrid_attention calls through hydracc.passes.HybridCall (see its docstring)"

KindLike = int | str | HeadKind
Window = tuple[int, int]


def is_hybrid_call(node: Any) -> bool:
    """Whether ``node`` is an fx call of ``hydracc::hybrid_attention``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == HYBRID_OP


def _as_kind(kind: KindLike) -> HeadKind:
    if isinstance(kind, HeadKind):
        return kind_by_code(kind.code)
    if isinstance(kind, bool):
        raise KeyError(f"head kind must be a name, a code or a HeadKind, not {kind!r}")
    if isinstance(kind, int):
        return kind_by_code(kind)
    if isinstance(kind, str):
        return kind_by_name(kind)
    raise KeyError(f"head kind must be a name, a code or a HeadKind, not {kind!r}")


def _graph_of(where: fx.GraphModule | fx.Graph) -> fx.Graph:
    return where.graph if isinstance(where, fx.GraphModule) else where


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


class HybridCall:
    """A typed, editable view of one ``hydracc::hybrid_attention`` node.

    ``HybridCall(node)`` raises ``PassError`` unless ``node`` calls the hybrid op. Properties
    read the node's current arguments; ``set_*`` methods validate and write them back.
    Heads are query heads, indexed by position in the current (possibly permuted) order.
    """

    def __init__(self, node: fx.Node) -> None:
        if not is_hybrid_call(node):
            what = f"{node.op} {node.target}" if isinstance(node, fx.Node) else type(node).__name__
            raise PassError(f"HybridCall needs a call of hydracc::hybrid_attention, got {what}", hint=_VIEW_HINT)
        self.node = node

    def __repr__(self) -> str:
        layer = self.node.meta.get(SITE_META, "?")
        return f"HybridCall(layer={layer}, kinds={self.kinds}, node={self.node.name})"

    # --- raw argument access (the only code that knows positions) ---------------------------

    def _get(self, index: int, default: Any = None) -> Any:
        args, name = self.node.args, _ARG_NAMES[index]
        if index < len(args):
            return args[index]
        return self.node.kwargs.get(name, default)

    def _set(self, index: int, value: Any) -> None:
        name = _ARG_NAMES[index]
        if index >= len(self.node.args) and name in self.node.kwargs:
            self.node.kwargs = {**self.node.kwargs, name: value}
            return
        args = list(self.node.args)
        if index >= len(args):  # head_windows given by keyword or not at all: it follows the params
            args += [[] for _ in range(index + 1 - len(args))]
        args[index] = value
        self.node.args = tuple(args)

    # --- reading ------------------------------------------------------------------------------

    @property
    def q(self) -> fx.Node:
        return self._get(_Q)

    @property
    def k(self) -> fx.Node:
        return self._get(_K)

    @property
    def v(self) -> fx.Node:
        return self._get(_V)

    @property
    def codes(self) -> list[int]:
        """The head kind code of every query head (the op's ``head_kinds``)."""
        return [int(c) for c in self._get(_KINDS, [])]

    @property
    def head_kinds(self) -> list[HeadKind]:
        """The ``HeadKind`` row of every query head."""
        return [kind_by_code(c) for c in self.codes]

    @property
    def kinds(self) -> list[str]:
        """The head kind name of every query head (``"full"``, ``"elu"``, ...)."""
        return [k.name for k in self.head_kinds]

    @property
    def scale(self) -> float:
        return float(self._get(_SCALE))

    @property
    def params(self) -> list[fx.Node]:
        """The learned-parameter nodes (``get_attr`` after ``hybridize``), empty or one per ``PARAM_NAMES``."""
        return list(self._get(_PARAMS, []))

    @property
    def param_nodes(self) -> dict[str, fx.Node]:
        """The learned-parameter nodes by name (``PARAM_NAMES``); ``{}`` for a layer without them."""
        params = self.params
        return dict(zip(PARAM_NAMES, params, strict=True)) if params else {}

    @property
    def param_targets(self) -> list[str]:
        """The graph-module attribute of each learned parameter (keys of ``ctx.added_params``' inverse)."""
        return [str(p.target) for p in self.params]

    @property
    def has_params(self) -> bool:
        return bool(self._get(_PARAMS, []))

    @property
    def raw_windows(self) -> list[int]:
        """The op's ``head_windows`` as stored: ``[]`` or ``[sink_0, window_0, sink_1, ...]``."""
        return [int(w) for w in self._get(_WINDOWS, [])]

    @property
    def windows(self) -> list[Window | None]:
        """Per query head: ``(sink, window)`` for a streaming head, ``None`` for other kinds."""
        raw, kinds = self.raw_windows, self.head_kinds
        if not raw:
            return [None] * len(kinds)
        return [(raw[2 * h], raw[2 * h + 1]) if kind.code == STREAMING.code else None for h, kind in enumerate(kinds)]

    @property
    def layer(self) -> int:
        """The decoder layer index of this site (``node.meta["hydracc_site"]``)."""
        if SITE_META not in self.node.meta:
            raise PassError(f"hybrid_attention node {self.node.name} has no layer index (meta {SITE_META!r})",
                            hint="calls made by hybridize carry it; copy node.meta when replacing a call")
        return int(self.node.meta[SITE_META])

    @property
    def num_heads(self) -> int:
        """Query heads (from q's shape; the number of kinds where the shape is unknown)."""
        shape = _shape(self.q)
        return shape[1] if shape is not None else len(self._get(_KINDS, []))

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (unexpanded: query head ``h`` reads KV head ``h // group_size``)."""
        shape = _shape(self.k)
        if shape is None:
            raise PassError(f"hybrid_attention node {self.node.name}: k has no shape metadata (meta 'val')")
        return shape[1]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_dim(self) -> int:
        shape = _shape(self.q)
        if shape is None:
            raise PassError(f"hybrid_attention node {self.node.name}: q has no shape metadata (meta 'val')")
        return shape[-1]

    def kv_head(self, head: int) -> int:
        """The KV head query head ``head`` reads."""
        return head // self.group_size

    def kv_groups(self) -> list[list[int]]:
        """The query heads of each KV head, in order."""
        g = self.group_size
        return [list(range(j * g, (j + 1) * g)) for j in range(self.num_kv_heads)]

    @property
    def head_order(self) -> list[int]:
        """The original index of the head at each position (identity until ``permute-heads`` moves heads)."""
        return list(self.node.meta.get(HEAD_ORDER_META, range(len(self._get(_KINDS, [])))))

    def heads(self, kind: KindLike) -> list[int]:
        """The query heads of ``kind`` (a name, code or ``HeadKind``)."""
        code = _as_kind(kind).code
        return [h for h, c in enumerate(self.codes) if c == code]

    def full_heads(self) -> list[int]:
        """The query heads that are ``full`` (causal softmax over every key)."""
        return self.heads("full")

    # --- writing ------------------------------------------------------------------------------

    def _error(self, message: str) -> PassError:
        layer = self.node.meta.get(SITE_META)
        where = f"layer {layer}" if layer is not None else f"node {self.node.name}"
        return PassError(f"hybrid_attention at {where}: {message}", hint=_VIEW_HINT)

    def _codes_for(self, kinds: Sequence[KindLike]) -> list[int]:
        if isinstance(kinds, (str, bytes)) or not isinstance(kinds, Iterable):
            raise self._error(f"kinds must be a list with one kind per query head, got {kinds!r}")
        kinds = list(kinds)
        if len(kinds) != self.num_heads:
            raise self._error(f"{len(kinds)} kinds given for {self.num_heads} query heads")
        codes = []
        for h, kind in enumerate(kinds):
            try:
                codes.append(_as_kind(kind).code)
            except KeyError as err:
                raise self._error(f"head {h}: {err.args[0]}") from None
        return codes

    def _flat_windows(self, windows: Sequence[Window | None] | Sequence[int] | None) -> list[int]:
        if windows is None or len(windows) == 0:
            return []
        items = list(windows)
        hq = self.num_heads
        if all(isinstance(w, int) and not isinstance(w, bool) for w in items):  # the op's flat form
            if len(items) != 2 * hq:
                raise self._error(f"flat head_windows must hold 2 * {hq} ints, got {len(items)}")
            return [int(w) for w in items]
        if len(items) != hq:
            raise self._error(f"{len(items)} windows given for {hq} query heads (one (sink, window) or None per head)")
        flat: list[int] = []
        for h, w in enumerate(items):
            if w is None:
                flat += [0, 0]
                continue
            try:
                sink, window = (int(x) for x in w)
            except (TypeError, ValueError):
                raise self._error(f"head {h}: window must be (sink, window) or None, got {w!r}") from None
            flat += [sink, window]
        return flat

    def _validate(self, codes: list[int], flat_windows: list[int], params: list[Any]) -> None:
        hq = self.num_heads
        if len(codes) != hq:
            raise self._error(f"head_kinds has {len(codes)} entries for {hq} query heads")
        kinds = []
        for h, code in enumerate(codes):
            try:
                kinds.append(kind_by_code(code))
            except KeyError as err:
                raise self._error(f"head {h}: {err.args[0]}") from None
        if flat_windows and len(flat_windows) != 2 * hq:
            raise self._error(f"head_windows has {len(flat_windows)} ints, expected 0 or 2 * {hq}")
        for h, kind in enumerate(kinds):
            if kind.code != STREAMING.code:
                continue
            if not flat_windows:
                raise self._error(f"head {h} is 'streaming' but the call has no windows; give windows=[(sink, window), ...]")
            sink, window = flat_windows[2 * h], flat_windows[2 * h + 1]
            if sink < 0 or window < 1:
                raise self._error(f"head {h} is 'streaming' with sink={sink}, window={window} (need sink >= 0, window >= 1)")
        if params and len(params) != len(PARAM_NAMES):
            raise self._error(f"head_params has {len(params)} entries, expected 0 or {len(PARAM_NAMES)} ({', '.join(PARAM_NAMES)})")
        if any(not isinstance(p, fx.Node) for p in params):
            raise self._error("head_params must be graph nodes (get_attr of the layer's buffers)")
        learned = [h for h, kind in enumerate(kinds) if kind.learned]
        if learned and not params:
            h = learned[0]
            raise self._error(
                f"head {h} is of the learned kind {kinds[h].name!r} but the layer has no learned parameters "
                "(the plan must give this layer parameters: plan the kind before hybridize)"
            )

    def check(self) -> None:
        """Raise ``PassError`` if the call's arguments are inconsistent (what ``PassManager`` runs)."""
        try:
            codes, windows, params = self.codes, self.raw_windows, self.params
            self.scale  # noqa: B018  (a number)
        except (TypeError, ValueError) as err:
            raise self._error(f"malformed arguments: {err}") from None
        if not all(isinstance(n, fx.Node) for n in (self.q, self.k, self.v)):
            raise self._error("q, k and v must be graph nodes")
        self._validate(codes, windows, params)

    _KEEP: Any = object()

    def set_kinds(self, kinds: Sequence[KindLike], *, windows: Any = _KEEP) -> None:
        """Set every query head's kind (names, codes or ``HeadKind`` rows), optionally with ``windows``
        (as in ``set_windows``); the call's windows are kept when not given."""
        codes = self._codes_for(kinds)
        flat = self.raw_windows if windows is HybridCall._KEEP else self._flat_windows(windows)
        self._validate(codes, flat, self.params)
        self._set(_KINDS, codes)
        if windows is not HybridCall._KEEP:
            self._set(_WINDOWS, flat)

    def set_kind(self, head: int, kind: KindLike, *, window: Window | None = None) -> None:
        """Set one head's kind (and, for a streaming head, its ``(sink, window)``)."""
        if not 0 <= head < self.num_heads:
            raise self._error(f"no head {head} (the layer has {self.num_heads})")
        kinds: list[KindLike] = list(self.codes)
        kinds[head] = kind
        if window is None:
            self.set_kinds(kinds)
            return
        windows = list(self.windows)
        windows[head] = window
        self.set_kinds(kinds, windows=windows)

    def set_windows(self, windows: Sequence[Window | None] | Sequence[int] | None) -> None:
        """Set the streaming windows: per head ``(sink, window)`` or ``None`` (stored as ``[0, 0]``),
        the op's flat ``[sink_0, window_0, ...]``, or ``None``/``[]`` for no windows."""
        codes = self.codes
        flat = self._flat_windows(windows)
        self._validate(codes, flat, self.params)
        self._set(_WINDOWS, flat)

    def set_params(self, params: Sequence[fx.Node] | Mapping[str, fx.Node]) -> None:
        """Set the learned-parameter nodes: ``[]``, the ``PARAM_NAMES`` nodes in order, or a name -> node map."""
        if isinstance(params, Mapping):
            if params and set(params) != set(PARAM_NAMES):
                raise self._error(f"params must name exactly {', '.join(PARAM_NAMES)}; got {', '.join(params)}")
            nodes = [params[name] for name in PARAM_NAMES] if params else []
        else:
            nodes = list(params)
        self._validate(self.codes, self.raw_windows, nodes)
        self._set(_PARAMS, nodes)

    def set_scale(self, scale: float) -> None:
        self._set(_SCALE, float(scale))

    def set_inputs(self, *, q: fx.Node | None = None, k: fx.Node | None = None, v: fx.Node | None = None) -> None:
        """Point the call at other q, k or v nodes (k, v unexpanded: ``[B, Hkv, T, D]``)."""
        for index, node in ((_Q, q), (_K, k), (_V, v)):
            if node is not None:
                self._set(index, node)

    def reorder_heads(self, order: Sequence[int]) -> None:
        """Move heads: position ``i`` gets the head now at ``order[i]`` (kinds, windows, ``head_order``).

        Only the graph is edited: the matching weight reorders are the caller's (``permute-heads``
        records them as ``WeightEdits``), as is keeping each query head on its KV head.
        """
        order = [int(i) for i in order]
        n = len(self._get(_KINDS, []))
        if sorted(order) != list(range(n)):
            raise self._error(f"order {order} is not a permutation of the {n} heads")
        codes, raw = self.codes, self.raw_windows
        new_codes = [codes[i] for i in order]
        new_windows = [w for i in order for w in raw[2 * i : 2 * i + 2]] if raw else []
        self._validate(new_codes, new_windows, self.params)
        previous = self.head_order
        self.node.meta[HEAD_ORDER_META] = [previous[i] for i in order]
        self._set(_KINDS, new_codes)
        self._set(_WINDOWS, new_windows)

    # --- making one ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        graph: fx.Graph,
        q: fx.Node,
        k: fx.Node,
        v: fx.Node,
        *,
        kinds: Sequence[KindLike],
        scale: float,
        params: Sequence[fx.Node] = (),
        windows: Sequence[Window | None] | Sequence[int] | None = (),
    ) -> HybridCall:
        """Insert a call at ``graph``'s insertion point (use ``graph.inserting_after(...)``) and return its view."""
        node = graph.call_function(HYBRID_OP, (q, k, v, [], float(scale), list(params), []))
        call = cls(node)
        try:
            codes = call._codes_for(kinds)
            flat = call._flat_windows(windows)
            call._validate(codes, flat, list(params))
        except PassError:
            graph.erase_node(node)
            raise
        call._set(_KINDS, codes)
        call._set(_WINDOWS, flat)
        return call


def hybrid_calls(where: fx.GraphModule | fx.Graph) -> Iterator[HybridCall]:
    """The ``hybrid_attention`` calls of a graph (module) as ``HybridCall`` views, in layer order.

    The list is taken before the first one is yielded, so a pass may replace calls while iterating.
    Calls without a layer index (graphs not made by hybridize) come in graph order.
    """
    calls = [HybridCall(n) for n in _graph_of(where).nodes if is_hybrid_call(n)]
    if all(SITE_META in c.node.meta for c in calls):
        calls.sort(key=lambda c: c.node.meta[SITE_META])
    yield from calls


def check_hybrid_calls(where: fx.GraphModule | fx.Graph, pass_name: str | None = None) -> None:
    """``HybridCall.check`` every call; the error names ``pass_name`` when given."""
    for call in hybrid_calls(where):
        try:
            call.check()
        except PassError as err:
            if pass_name is None:
                raise
            raise PassError(f"pass {pass_name!r} left an invalid call: {err.args[0]}", hint=err.hint) from None


class SdpaCall:
    """A view of an attention site before the rewrite: an ``aten.scaled_dot_product_attention`` node."""

    def __init__(self, node: fx.Node) -> None:
        if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == SDPA):
            raise PassError(f"SdpaCall needs an aten.scaled_dot_product_attention call, got {node!r}")
        self.node = node

    @property
    def q(self) -> fx.Node:
        return self.node.args[0] if self.node.args else self.node.kwargs["query"]

    @property
    def k(self) -> fx.Node:
        return self.node.args[1] if len(self.node.args) > 1 else self.node.kwargs["key"]

    @property
    def v(self) -> fx.Node:
        return self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs["value"]

    @property
    def layer(self) -> int:
        return int(self.node.meta[SITE_META])

    @property
    def enable_gqa(self) -> bool:
        return bool(self.node.kwargs.get("enable_gqa", False))

    def set_kv(self, k: fx.Node, v: fx.Node, *, enable_gqa: bool = True) -> None:
        """Read ``k``, ``v`` instead (with ``enable_gqa`` when they have fewer heads than q)."""
        args = list(self.node.args)
        args[1], args[2] = k, v
        self.node.args = tuple(args)
        self.node.kwargs = {**self.node.kwargs, "enable_gqa": enable_gqa}


def sdpa_sites(where: fx.GraphModule | fx.Graph) -> Iterator[SdpaCall]:
    """The SDPA nodes that are attention sites (carry ``node.meta["hydracc_site"]``), in graph order."""
    yield from [SdpaCall(n) for n in _graph_of(where).nodes
                if n.op == "call_function" and n.target == SDPA and SITE_META in n.meta]
