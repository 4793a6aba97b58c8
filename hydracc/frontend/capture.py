"""Capture a model with ``torch.export`` and find its attention sites in the graph.

Design decisions:
- The model is exported with static shapes (a small batch and length) on meta
  parameters; the result is the ``ExportedProgram``'s own ``GraphModule`` in which
  parameters and buffers are placeholders, so passes can see and rename weights and the
  graph can later be run with real weights supplied from outside.
- Sites are found from the graph alone: every ``aten.scaled_dot_product_attention`` node
  is a candidate. Head counts, head dim and scale come from the node's tensors and
  arguments; the GQA expansion (``unsqueeze -> expand -> reshape``) is looked through to
  find the KV heads; the mask is evaluated on its own (it depends only on positions) and
  must be plainly causal. The projections feeding and consuming the heads are found by
  walking the graph to the nearest matmul with a parameter weight.
- Candidates that fail a check are kept as ``RejectedSite`` with the reason, so an
  unsupported architecture gets an error that says what was seen, not a traceback.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from collections import deque
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from hydracc.errors import UnsupportedModelError

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SITE_META = "hydracc_site"
"""``node.meta`` key holding the layer index of an attention site (kept by rewrites)."""

_SHAPE_OPS = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
}


@dataclass(frozen=True)
class Projection:
    """Where a block of head channels lives in a weight.

    Channels ``offset .. offset + heads * head_dim`` along ``dim`` of ``weight`` belong to
    the heads, head-major (head ``h`` owns ``offset + h*head_dim .. offset + (h+1)*head_dim``).
    ``bias`` (if any) holds the same channels along its dim 0.
    """

    weight: str
    dim: int
    offset: int
    bias: str | None = None


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation in the captured graph."""

    layer: int
    module: str
    node: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    q_proj: Projection | None = None
    k_proj: Projection | None = None
    v_proj: Projection | None = None
    o_proj: Projection | None = None

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def attention_kind(self) -> str:
        if self.num_kv_heads == self.num_heads:
            return "MHA"
        return "MQA" if self.num_kv_heads == 1 else "GQA"

    @property
    def permutable(self) -> bool:
        """Whether all four projections were found, so heads can be reordered in the weights."""
        return None not in (self.q_proj, self.k_proj, self.v_proj, self.o_proj)


@dataclass(frozen=True)
class RejectedSite:
    """An SDPA node hydracc saw but cannot convert, and why."""

    module: str
    node: str
    reason: str


@dataclass
class CapturedModel:
    """A model captured as an fx graph, with its attention sites."""

    exported: torch.export.ExportedProgram
    graph_module: fx.GraphModule
    sites: list[AttentionSite]
    rejected: list[RejectedSite]
    config: Any
    input_shape: tuple[int, int]
    placeholder_targets: dict[str, str] = field(default_factory=dict)
    """Placeholder name -> parameter/buffer/constant name it stands for."""

    def site(self, layer: int) -> AttentionSite:
        for s in self.sites:
            if s.layer == layer:
                return s
        raise KeyError(f"no attention site for layer {layer}")

    def parameter_shape(self, name: str) -> tuple[int, ...]:
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder" and self.placeholder_targets.get(node.name) == name:
                return tuple(node.meta["val"].shape)
        raise KeyError(name)

    def graph_inputs(self, weights: dict[str, torch.Tensor], input_ids: torch.Tensor) -> list[Any]:
        """The positional inputs of ``graph_module`` for ``input_ids`` and real ``weights``.

        ``weights`` maps parameter names to tensors; buffers and constants come from the
        capture (they are computed from the config, not read from the checkpoint).
        """
        if tuple(input_ids.shape) != self.input_shape:
            raise ValueError(f"the graph was captured for input shape {self.input_shape}, got {tuple(input_ids.shape)}")
        sig = self.exported.graph_signature
        args: list[Any] = []
        for spec in sig.input_specs:
            kind = spec.kind.name
            if kind == "PARAMETER":
                args.append(weights[spec.target])
            elif kind == "BUFFER":
                args.append(weights.get(spec.target, self.exported.state_dict.get(spec.target, self.exported.constants.get(spec.target))))
            elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
                args.append(self.exported.constants[spec.target])
            elif kind == "USER_INPUT":
                if spec.arg.name == "input_ids":
                    args.append(input_ids)
                else:
                    args.append(None)
            else:  # pragma: no cover - defensive
                raise ValueError(f"unsupported graph input kind {kind}")
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.device.type == "meta":
                raise ValueError(f"graph input {sig.input_specs[i].target} has no data (meta); pass it in weights")
        return args

    def graph_on(self, device: torch.device) -> fx.GraphModule:
        """``graph_module`` with its tensor factories retargeted to ``device`` (see ``_on_device``)."""
        return _on_device(self.graph_module, device)

    def run(self, weights: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        """Run the (possibly rewritten) graph with real ``weights``; return the logits."""
        out = self.graph_on(input_ids.device)(*self.graph_inputs(weights, input_ids))
        return out[0] if isinstance(out, (tuple, list)) else out


def _on_device(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of ``gm`` whose tensor factories (``arange``, ``zeros``...) target ``device``.

    A graph captured on meta parameters bakes ``device=meta`` into ops that create
    tensors (positions, masks), also inside higher-order-op subgraphs; to run it with
    real weights those must move. The captured graph itself is left as it is.
    """

    def is_stale(x: Any) -> bool:
        return isinstance(x, torch.device) and x != device

    def move(x: Any) -> Any:
        return device if is_stale(x) else x

    def stale(g: fx.GraphModule) -> list[fx.Node]:
        leaves = torch.utils._pytree.tree_leaves
        return [n for n in g.graph.nodes if any(is_stale(x) for x in leaves((n.args, n.kwargs)))]

    if not any(stale(m) for m in gm.modules() if isinstance(m, fx.GraphModule)):
        return gm
    copy = deepcopy(gm)
    for module in copy.modules():
        if isinstance(module, fx.GraphModule):
            for node in stale(module):
                node.args = torch.utils._pytree.tree_map(move, node.args)
                node.kwargs = torch.utils._pytree.tree_map(move, node.kwargs)
            module.recompile()
    return copy


def capture(model: nn.Module, *, batch: int = 2, seq_len: int = 16) -> CapturedModel:
    """Export ``model`` (a transformers causal LM with SDPA attention) and find its attention sites."""
    device = next(iter(model.parameters())).device
    ids_device = torch.device("cpu") if device.type == "meta" else device
    input_ids = torch.zeros((batch, seq_len), dtype=torch.long, device=ids_device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, (), {"input_ids": input_ids, "use_cache": False}, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
        raise UnsupportedModelError(
            f"torch.export could not capture the {type(model).__name__} model: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            hint="hydracc needs a model that torch.export can trace (transformers' SDPA attention path)",
        ) from exc
    gm = exported.graph_module
    sig = exported.graph_signature
    targets: dict[str, str] = {}
    for spec in sig.input_specs:
        if spec.target is not None:
            targets[spec.arg.name] = spec.target
    sites, rejected = find_attention_sites(gm, targets, model.config)
    return CapturedModel(exported, gm, sites, rejected, model.config, (batch, seq_len), targets)


def find_attention_sites(
    gm: fx.GraphModule, targets: dict[str, str], config: Any = None
) -> tuple[list[AttentionSite], list[RejectedSite]]:
    """Find every SDPA node of ``gm`` and describe it, or say why it cannot be converted."""
    sites: list[AttentionSite] = []
    rejected: list[RejectedSite] = []
    seen_layers: set[int] = set()
    candidates = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]
    for index, node in enumerate(candidates):
        module = _module_path(node)
        try:
            site = _describe_site(gm, node, module, index, targets, config)
        except _Reject as why:
            rejected.append(RejectedSite(module, node.name, str(why)))
            continue
        if site.layer in seen_layers:
            rejected.append(RejectedSite(module, node.name, f"a second attention in layer {site.layer}"))
            continue
        seen_layers.add(site.layer)
        node.meta[SITE_META] = site.layer
        sites.append(site)
    return sites, rejected


class _Reject(Exception):
    pass


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<unknown>"
    return list(stack.values())[-1][0]


def _layer_index(module: str, fallback: int) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", module)
    return int(numbers[0]) if len(numbers) == 1 else fallback


def _val(node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def unexpanded_kv(node: fx.Node) -> fx.Node:
    """Look through transformers' ``repeat_kv`` (unsqueeze(2) -> expand -> reshape) to the KV heads.

    Returns ``node`` itself when it is not such an expansion.
    """
    if node.op != "call_function" or node.target not in _SHAPE_OPS:
        return node
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target != torch.ops.aten.expand.default:
        return node
    unsq = expand.args[0]
    if not isinstance(unsq, fx.Node) or unsq.target != torch.ops.aten.unsqueeze.default or unsq.args[1] != 2:
        return node
    source = unsq.args[0]
    src, out = _val(source), _val(node)
    if src is None or out is None or src.dim() != 4 or out.dim() != 4:
        return node
    if src.shape[0] != out.shape[0] or src.shape[2:] != out.shape[2:] or out.shape[1] % src.shape[1]:
        return node
    return source  # type: ignore[return-value]


def _describe_site(
    gm: fx.GraphModule, node: fx.Node, module: str, index: int, targets: dict[str, str], config: Any
) -> AttentionSite:
    args = list(node.args) + [None] * (8 - len(node.args))
    q, k, v = args[0], args[1], args[2]
    mask = node.kwargs.get("attn_mask", args[3])
    dropout = node.kwargs.get("dropout_p", args[4] or 0.0)
    is_causal = node.kwargs.get("is_causal", args[5] or False)
    scale = node.kwargs.get("scale", args[6])
    qv, kv_, vv = _val(q), _val(k), _val(v)
    if qv is None or kv_ is None or vv is None or qv.dim() != 4:
        raise _Reject("query/key/value are not 4-d tensors of known shape")
    if dropout:
        raise _Reject(f"attention dropout {dropout} is active (export the model in eval mode)")
    batch, num_heads, tq, head_dim = qv.shape
    if vv.shape[-1] != head_dim or kv_.shape[-1] != head_dim:
        raise _Reject("value or key head dim differs from the query head dim")
    k_src, v_src = unexpanded_kv(k), unexpanded_kv(v)
    num_kv_heads = _val(k_src).shape[1]  # type: ignore[union-attr]
    if _val(v_src).shape[1] != num_kv_heads:  # type: ignore[union-attr]
        raise _Reject("keys and values have different numbers of heads")
    if num_heads % num_kv_heads:
        raise _Reject(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if kv_.shape[2] != tq:
        raise _Reject("query and key lengths differ in the captured graph (cross-attention or a cache)")
    if is_causal:
        causal = True
    elif isinstance(mask, fx.Node):
        causal = _mask_is_causal(gm, mask, tq)
    else:
        causal = False
    if not causal:
        raise _Reject("the attention mask is not plainly causal (bidirectional, sliding-window or custom mask)")
    window = _sliding_window(config, _layer_index(module, index))
    if window is not None:
        raise _Reject(f"sliding-window attention (window {window}) is not supported yet")
    return AttentionSite(
        layer=_layer_index(module, index),
        module=module,
        node=node.name,
        num_heads=int(num_heads),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(head_dim),
        causal=True,
        q_proj=_input_projection(q, num_heads, head_dim, targets),
        k_proj=_input_projection(k_src, num_kv_heads, head_dim, targets),
        v_proj=_input_projection(v_src, num_kv_heads, head_dim, targets),
        o_proj=_output_projection(node, num_heads, head_dim, targets),
    )


def _sliding_window(config: Any, layer: int) -> int | None:
    if config is None:
        return None
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer < len(layer_types):
        return window if layer_types[layer] == "sliding_attention" else None
    if window and getattr(config, "use_sliding_window", True):
        return int(window)
    return None


def reachable_nodes(starts: list[fx.Node], step: Callable[[fx.Node], Any]) -> set[fx.Node]:
    """Every node reachable from ``starts`` (included) by repeatedly following ``step``
    (``lambda n: n.users`` downstream, ``lambda n: n.all_input_nodes`` upstream)."""
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def _mask_is_causal(gm: fx.GraphModule, mask: fx.Node, length: int) -> bool:
    """Evaluate the mask's subgraph on zeros (it depends on positions only) and compare with tril."""
    needed = reachable_nodes([mask], lambda n: n.all_input_nodes)
    env: dict[fx.Node, Any] = {}
    cpu = torch.device("cpu")

    def to_cpu(x: Any) -> Any:
        return cpu if isinstance(x, torch.device) else x

    try:
        for n in gm.graph.nodes:
            if n not in needed:
                continue
            if n.op == "placeholder":
                val = n.meta["val"]
                if val.numel() > 1 << 20:
                    return False
                env[n] = torch.zeros(val.shape, dtype=val.dtype)
            elif n.op == "call_function":
                a = torch.utils._pytree.tree_map(to_cpu, fx.node.map_arg(n.args, env.__getitem__))
                kw = torch.utils._pytree.tree_map(to_cpu, fx.node.map_arg(n.kwargs, env.__getitem__))
                env[n] = n.target(*a, **kw)
            elif n.op == "get_attr":
                env[n] = getattr(gm, n.target)
            else:
                return False
        value = env[mask]
    except Exception:
        return False
    if not isinstance(value, torch.Tensor) or value.shape[-2:] != (length, length):
        return False
    tril = torch.ones(length, length, dtype=torch.bool).tril()
    if value.dtype == torch.bool:
        allowed = value
    else:  # additive float mask: 0 where allowed, -inf (or very negative) where not
        allowed = value > torch.finfo(value.dtype).min / 2
    return bool((allowed == tril).all())


_MATMULS = {
    torch.ops.aten.linear.default: ("linear", 1),
    torch.ops.aten.addmm.default: ("addmm", 2),
    torch.ops.aten.mm.default: ("mm", 1),
}


def _param_of(node: Any, targets: dict[str, str]) -> str | None:
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return targets.get(node.name)
    return None


def _input_projection(start: fx.Node, heads: int, head_dim: int, targets: dict[str, str]) -> Projection | None:
    """Walk up from a q/k/v tensor to the matmul producing it; locate the head channels."""
    parent: dict[fx.Node, fx.Node | None] = {start: None}
    queue = deque([start])
    found: fx.Node | None = None
    while queue:
        n = queue.popleft()
        if n.op == "call_function" and n.target in _MATMULS:
            kind, widx = _MATMULS[n.target]
            if _param_of(n.args[widx], targets):
                found = n
                break
            continue
        if n.op == "call_function" and n.target is torch.ops.higher_order.wrap_with_set_grad_enabled:
            continue
        for a in n.all_input_nodes:
            if a not in parent:
                parent[a] = n
                queue.append(a)
    if found is None:
        return None
    kind, widx = _MATMULS[found.target]
    weight = _param_of(found.args[widx], targets)
    bias = _param_of(found.args[0], targets) if kind == "addmm" else (
        _param_of(found.args[2], targets) if kind == "linear" and len(found.args) > 2 else None
    )
    dim = 0 if kind == "linear" else 1
    # Walk back down the path from the matmul towards the site, tracking the channel offset
    # of splits/slices on the last dim until the view that splits channels into heads.
    path: list[fx.Node] = []
    cur: fx.Node | None = found
    while cur is not None:
        path.append(cur)
        cur = parent[cur]
    offset = 0
    for prev, n in zip(path, path[1:]):
        pv, nv = _val(prev), _val(n)
        if n.target is operator.getitem and isinstance(prev.target, torch._ops.OpOverload):
            split_args = prev.args
            idx = n.args[1]
            if prev.target == torch.ops.aten.split.Tensor:
                offset += idx * split_args[1]
            elif prev.target == torch.ops.aten.split_with_sizes.default:
                offset += sum(split_args[1][:idx])
            else:
                return None
        elif n.target == torch.ops.aten.slice.Tensor and pv is not None and n.args[1] in (-1, pv.dim() - 1):
            offset += n.args[2] or 0
        elif n.target in _SHAPE_OPS and pv is not None and nv is not None and nv.shape[-1] == head_dim and pv.shape[-1] != head_dim:
            if pv.shape[-1] != heads * head_dim:
                return None
            break
    return Projection(weight=weight, dim=dim, offset=int(offset), bias=bias)  # type: ignore[arg-type]


def _output_projection(node: fx.Node, heads: int, head_dim: int, targets: dict[str, str]) -> Projection | None:
    """Follow the attention output through layout ops to the projection consuming the heads."""
    cur = node
    for _ in range(8):
        if len(cur.users) != 1:
            return None
        (user,) = cur.users
        if user.op == "call_function" and user.target in _MATMULS:
            kind, widx = _MATMULS[user.target]
            weight = _param_of(user.args[widx], targets)
            data_arg = user.args[1] if kind == "addmm" else user.args[0]
            if weight is None or data_arg is not cur:
                return None
            if _val(cur) is None or _val(cur).shape[-1] != heads * head_dim:  # type: ignore[union-attr]
                return None
            return Projection(weight=weight, dim=1 if kind == "linear" else 0, offset=0, bias=None)
        cur = user
    return None


def require_sites(captured: CapturedModel) -> None:
    """Raise ``UnsupportedModelError`` unless every attention in the model was recognised."""
    expected = getattr(captured.config, "num_hidden_layers", None)
    if captured.rejected or not captured.sites or (expected and len(captured.sites) != expected):
        lines = [f"  recognised: layer {s.layer} at {s.module} ({s.attention_kind})" for s in captured.sites]
        lines += [f"  NOT recognised: {r.module} (node {r.node}): {r.reason}" for r in captured.rejected]
        if not captured.sites and not captured.rejected:
            lines.append("  no scaled_dot_product_attention node in the captured graph")
        if expected and len(captured.sites) + len(captured.rejected) < expected:
            lines.append(f"  the config has {expected} layers but only {len(captured.sites) + len(captured.rejected)} attention nodes were found")
        raise UnsupportedModelError(
            f"cannot convert this {captured.config.model_type} model: not every attention site can be converted\n"
            + "\n".join(lines),
            hint="hydracc rewrites causal self-attention computed with SDPA; see docs/architecture.md",
        )
