"""Pass ``fold-gqa``: attention sites take the unexpanded keys and values.

Design: transformers expands K/V for grouped-query attention with ``repeat_kv``
(``unsqueeze(2) -> expand -> reshape``) before SDPA. This pass points each site's SDPA
at the unexpanded K/V and sets ``enable_gqa=True``, which computes the same thing; the
expansion nodes become dead and are removed. The hybrid op is GQA-native, so after this
pass no copy of K/V per query head is left in the graph.
"""

from __future__ import annotations

from hydracc.frontend.capture import SDPA, SITE_META, unexpanded_kv
from hydracc.passes.manager import PassContext, register_pass


@register_pass("fold-gqa", description="attention sites read unexpanded K/V (SDPA enable_gqa) instead of repeat_kv copies")
def fold_gqa(ctx: PassContext) -> None:
    graph = ctx.graph_module.graph
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != SDPA or SITE_META not in node.meta:
            continue
        k, v = node.args[1], node.args[2]
        k_src, v_src = unexpanded_kv(k), unexpanded_kv(v)
        if k_src is k and v_src is v:
            continue
        args = list(node.args)
        args[1], args[2] = k_src, v_src
        node.args = tuple(args)
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        folded += 1
    graph.eliminate_dead_code()
    if folded:
        ctx.notes.append(f"fold-gqa: {folded} site(s) now read unexpanded K/V")
