"""Pass ``permute-heads``: reorder heads so that the full ones come first in every layer.

Design: kernels run full and linear heads best as two contiguous blocks. Reordering
heads is free at run time if it is done in the weights: query heads are reordered in
the rows of the Q projection and the matching input channels of the O projection, KV
heads in the K and V projections. Under GQA the order is built from whole KV groups
(groups with a full head first), and query heads move only inside their group, so every
query head keeps its KV head. The pass edits the op's kinds in the graph and records
the weight reorders as ``WeightEdits``; ``node.meta['hydracc_head_order']`` keeps the
original index of every head for provenance. Before a reorder is accepted it is checked
numerically on the block (``block_check``); a layer where something else depends on head
order (e.g. a norm over all head channels) is left as it is, with a note.
"""

from __future__ import annotations

from hydracc.frontend.capture import SITE_META, AttentionSite, Projection
from hydracc.kernels.head_kinds import kind_by_code
from hydracc.passes.block_check import reorder_is_exact
from hydracc.passes.hybridize import hybrid_nodes
from hydracc.passes.manager import PassContext, register_pass
from hydracc.passes.weight_edits import WeightEdits

HEAD_ORDER_META = "hydracc_head_order"


def full_first_order(codes: list[int], num_kv_heads: int) -> tuple[list[int], list[int]]:
    """(query-head order, KV-head order) putting full heads and groups first, stable otherwise."""
    group = len(codes) // num_kv_heads

    def full(h: int) -> bool:
        return kind_by_code(codes[h]).keeps_kv

    groups = sorted(range(num_kv_heads), key=lambda g: not any(full(g * group + i) for i in range(group)))
    order: list[int] = []
    for g in groups:
        members = [g * group + i for i in range(group)]
        order += sorted(members, key=lambda h: not full(h))
    return order, groups


def _reorder(edits: WeightEdits, ctx: PassContext, proj: Projection, head_dim: int, order: list[int]) -> None:
    size = ctx.captured.parameter_shape(proj.weight)[proj.dim]
    edits.reorder_blocks(proj.weight, proj.dim, size, proj.offset, head_dim, order)
    if proj.bias is not None:
        bsize = ctx.captured.parameter_shape(proj.bias)[0]
        edits.reorder_blocks(proj.bias, 0, bsize, proj.offset, head_dim, order)


def site_edits(ctx: PassContext, site: AttentionSite, order: list[int], kv_order: list[int]) -> WeightEdits:
    """The weight reorders that move ``site``'s heads into ``order`` (KV heads into ``kv_order``)."""
    assert site.q_proj and site.k_proj and site.v_proj and site.o_proj
    edits = WeightEdits()
    _reorder(edits, ctx, site.q_proj, site.head_dim, order)
    _reorder(edits, ctx, site.k_proj, site.head_dim, kv_order)
    _reorder(edits, ctx, site.v_proj, site.head_dim, kv_order)
    _reorder(edits, ctx, site.o_proj, site.head_dim, order)
    return edits


@register_pass("permute-heads", description="reorder heads in the projection weights so full heads are contiguous and first")
def permute_heads(ctx: PassContext) -> None:
    checked: dict[tuple, bool] = {}
    for node in hybrid_nodes(ctx.graph_module.graph):
        site = ctx.captured.site(node.meta[SITE_META])
        codes = list(node.args[3])
        if not site.permutable:
            ctx.notes.append(f"permute-heads: layer {site.layer} skipped (projection weights not found in the graph)")
            continue
        order, kv_order = full_first_order(codes, site.num_kv_heads)
        if order == list(range(len(codes))):
            continue
        edits = site_edits(ctx, site, order, kv_order)
        attrs = {str(p.target) for p in node.args[5]}
        added = {attr: name for name, attr in ctx.added_params.items() if attr in attrs}
        for name in added.values():  # learned parameters are indexed by query head: reorder their rows
            edits.reorder_blocks(name, 0, len(codes), 0, 1, order)
        new_codes = [codes[i] for i in order]
        windows = list(node.args[6])
        new_windows = [w for i in order for w in windows[2 * i : 2 * i + 2]] if windows else []
        weights = {k: getattr(site, f"{k}_proj").weight for k in ("q", "k", "v", "o")}
        if not reorder_is_exact(ctx.captured, node, weights, edits.apply, codes, new_codes, cache=checked,
                                windows=windows, new_windows=new_windows, added=added):
            ctx.notes.append(
                f"permute-heads: layer {site.layer} skipped (reordering heads changes the block's output: "
                "something between the projections and the heads depends on head order)"
            )
            continue
        ctx.weight_edits.merge(edits)
        previous = node.meta.get(HEAD_ORDER_META, list(range(len(codes))))
        node.meta[HEAD_ORDER_META] = [previous[i] for i in order]
        args = list(node.args)
        args[3] = new_codes
        args[6] = new_windows
        node.args = tuple(args)
