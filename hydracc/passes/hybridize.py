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
from hydracc.kernels.kinds import PARAM_NAMES, param_shapes
from hydracc.passes.hybrid_call import HYBRID_OP, HybridCall, is_hybrid_call, sdpa_sites
from hydracc.passes.manager import PassContext, register_pass

__all__ = ["HYBRID_OP", "added_param_attr", "bind_added_params", "hybrid_nodes", "hybridize"]


@register_pass("hybridize", description="replace each SDPA site by hydracc::hybrid_attention with the plan's head kinds")
def hybridize(ctx: PassContext) -> None:
    """Counts: ``sites_rewritten``, ``non_full_heads`` (heads no longer full), ``layers_with_params``,
    ``params_added`` (learned-parameter buffers added)."""
    if ctx.plan is None:
        raise PassError("pass 'hybridize' needs a plan")
    graph = ctx.graph_module.graph
    rewritten = non_full = with_params = added = 0
    for sdpa in sdpa_sites(graph):
        node = sdpa.node
        layer = sdpa.layer
        site = ctx.captured.site(layer)
        layer_plan = ctx.plan.layer(layer)
        q, k, v = sdpa.q, sdpa.k, sdpa.v
        kv_heads = k.meta["val"].shape[1]
        if kv_heads != site.num_kv_heads:
            raise PassError(
                f"pass 'hybridize': layer {layer} still reads expanded K/V ({kv_heads} heads, "
                f"{site.num_kv_heads} KV heads expected)",
                hint="run 'fold-gqa' before 'hybridize'",
            )
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
            with_params += 1
            added += len(params)
        with graph.inserting_after(node):
            call = HybridCall.create(graph, q, k, v, kinds=[h.kind for h in layer_plan.heads], scale=float(site.scale),
                                     params=params, windows=layer_plan.head_windows())
        new = call.node
        new.meta.update({key: val for key, val in node.meta.items() if key != "val"})
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
        non_full += len(call.codes) - len(call.full_heads())
    graph.eliminate_dead_code()
    ctx.count("sites_rewritten", rewritten)
    ctx.count("non_full_heads", non_full)
    ctx.count("layers_with_params", with_params)
    ctx.count("params_added", added)


def hybrid_nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The hybrid attention nodes of ``graph``, in graph order (prefer ``hybrid_calls``, which gives views)."""
    return [n for n in graph.nodes if is_hybrid_call(n)]


def added_param_attr(layer: int, name: str) -> str:
    """The graph-module attribute holding learned parameter ``name`` of ``layer``."""
    return f"hydracc_l{layer}_{name}"


def bind_added_params(gm: torch.fx.GraphModule, added: dict[str, str], values: dict[str, torch.Tensor]) -> None:
    """Give the graph's learned-parameter buffers real ``values`` (checkpoint name -> tensor)."""
    for ck_name, attr in added.items():
        if ck_name not in values:
            raise KeyError(f"no value for learned parameter {ck_name}")
        setattr(gm, attr, values[ck_name])
