"""Pass ``hybridize``: replace each attention site's SDPA by ``hydracc::hybrid_attention``.

Design: the plan gives a kind per query head; the pass writes those kinds (as integer
codes) into the op's arguments, so the graph itself says what each head computes and
the emit stage reads the converted layout from the graph, not from the plan. The op is
causal by construction, so the SDPA mask (checked to be causal at capture) is dropped.
K/V must already be unexpanded (run ``fold-gqa`` first).

Streaming heads' sink and window go into the op's ``head_windows``. A layer the plan
gives learned parameters (``Plan.layer_has_params``) reads them through ``get_attr``
nodes of meta buffers on the graph module (``hydracc_l{layer}_{name}``); the checkpoint
name of each (``{attention module}.hydra.{name}``) is recorded in
``ctx.added_params``. Their values come later (init, distill) and are bound to the
graph with ``bind_added_params`` when it must run.
"""

from __future__ import annotations

import torch

import hydracc.kernels  # noqa: F401  (registers hydracc::hybrid_attention)
from hydracc.errors import PassError
from hydracc.frontend.capture import SDPA, SITE_META
from hydracc.kernels.head_kinds import PARAM_NAMES, kind_by_name, param_shapes
from hydracc.passes.manager import PassContext, register_pass

HYBRID_OP = torch.ops.hydracc.hybrid_attention.default


@register_pass("hybridize", description="replace each SDPA site by hydracc::hybrid_attention with the plan's head kinds")
def hybridize(ctx: PassContext) -> None:
    if ctx.plan is None:
        raise PassError("pass 'hybridize' needs a plan")
    graph = ctx.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != SDPA or SITE_META not in node.meta:
            continue
        layer = node.meta[SITE_META]
        site = ctx.captured.site(layer)
        layer_plan = ctx.plan.layer(layer)
        q, k, v = node.args[0], node.args[1], node.args[2]
        kv_heads = k.meta["val"].shape[1]
        if kv_heads != site.num_kv_heads:
            raise PassError(
                f"pass 'hybridize': layer {layer} still reads expanded K/V ({kv_heads} heads, "
                f"{site.num_kv_heads} KV heads expected)",
                hint="run 'fold-gqa' before 'hybridize'",
            )
        codes = [kind_by_name(h.kind).code for h in layer_plan.heads]
        params: list[torch.fx.Node] = []
        if ctx.plan.layer_has_params(layer_plan):
            shapes = param_shapes(site.num_heads, site.head_dim)
            with graph.inserting_before(node):
                for name in PARAM_NAMES:
                    attr = added_param_attr(layer, name)
                    ctx.graph_module.register_buffer(attr, torch.empty(shapes[name], device="meta"))
                    ctx.added_params[f"{site.module}.hydra.{name}"] = attr
                    getter = graph.get_attr(attr)
                    params.append(getter)
        with graph.inserting_after(node):
            new = graph.call_function(HYBRID_OP, (q, k, v, codes, float(site.scale), params, layer_plan.head_windows()))
        new.meta.update({key: val for key, val in node.meta.items() if key != "val"})
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()


def hybrid_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The hybrid attention nodes of ``graph``, in graph order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target == HYBRID_OP]


def added_param_attr(layer: int, name: str) -> str:
    """The graph-module attribute holding learned parameter ``name`` of ``layer``."""
    return f"hydracc_l{layer}_{name}"


def bind_added_params(gm: torch.fx.GraphModule, added: dict[str, str], values: dict[str, torch.Tensor]) -> None:
    """Give the graph's learned-parameter buffers real ``values`` (checkpoint name -> tensor)."""
    for ck_name, attr in added.items():
        if ck_name not in values:
            raise KeyError(f"no value for learned parameter {ck_name}")
        setattr(gm, attr, values[ck_name])
