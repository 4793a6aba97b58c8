"""Pass ``fold-gqa``: attention sites take the unexpanded keys and values.

Design: transformers expands K/V for grouped-query attention with ``repeat_kv``
(``unsqueeze(2) -> expand -> reshape``) before SDPA. This pass points each site's SDPA
at the unexpanded K/V and sets ``enable_gqa=True``, which computes the same thing; the
expansion nodes become dead and are removed. The hybrid op is GQA-native, so after this
pass no copy of K/V per query head is left in the graph.
"""

from __future__ import annotations

from hydracc.frontend.capture import unexpanded_kv
from hydracc.passes.hybrid_call import sdpa_sites
from hydracc.passes.manager import PassContext, register_pass


@register_pass("fold-gqa", description="attention sites read unexpanded K/V (SDPA enable_gqa) instead of repeat_kv copies")
def fold_gqa(ctx: PassContext) -> None:
    """Counts: ``sites_folded`` (sites now reading unexpanded K/V), ``repeat_kv_removed`` (K and V
    expansions no longer read), ``nodes_removed`` (dead nodes erased)."""
    graph = ctx.graph_module.graph
    folded = expansions = 0
    for site in sdpa_sites(graph):
        k, v = site.k, site.v
        k_src, v_src = unexpanded_kv(k), unexpanded_kv(v)
        if k_src is k and v_src is v:
            continue
        site.set_kv(k_src, v_src, enable_gqa=True)
        folded += 1
        expansions += (k_src is not k) + (v_src is not v)
    before = len(graph.nodes)
    graph.eliminate_dead_code()
    ctx.count("sites_folded", folded)
    ctx.count("repeat_kv_removed", expansions)
    ctx.count("nodes_removed", before - len(graph.nodes))
    if folded:
        ctx.notes.append(f"fold-gqa: {folded} site(s) now read unexpanded K/V")
