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

from hydracc.frontend.capture import AttentionSite, Projection
from hydracc.kernels.kinds import kind_by_code
from hydracc.passes.block_check import reorder_is_exact
from hydracc.passes.hybrid_call import HEAD_ORDER_META
from hydracc.passes.manager import PassContext, register_pass
from hydracc.passes.weight_edits import WeightEdits

__all__ = ["HEAD_ORDER_META", "full_first_order", "permute_heads", "site_edits"]


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
    """Counts: ``layers_permuted``, ``layers_unpermuted`` (skipped: weights not found or the block
    check failed), ``layers_already_ordered``, ``heads_moved`` (query heads whose position changed)."""
    checked: dict[tuple, bool] = {}
    for what in ("layers_permuted", "layers_unpermuted", "layers_already_ordered", "heads_moved"):
        ctx.count(what, 0)  # every counter shows, in this order
    for call in ctx.hybrid_calls():
        site = ctx.captured.site(call.layer)
        codes = call.codes
        if not site.permutable:
            ctx.notes.append(f"permute-heads: layer {site.layer} skipped (projection weights not found in the graph)")
            ctx.count("layers_unpermuted")
            continue
        order, kv_order = full_first_order(codes, site.num_kv_heads)
        if order == list(range(len(codes))):
            ctx.count("layers_already_ordered")
            continue
        edits = site_edits(ctx, site, order, kv_order)
        attrs = set(call.param_targets)
        added = {attr: name for name, attr in ctx.added_params.items() if attr in attrs}
        for name in added.values():  # learned parameters are indexed by query head: reorder their rows
            edits.reorder_blocks(name, 0, len(codes), 0, 1, order)
        new_codes = [codes[i] for i in order]
        windows = call.raw_windows
        new_windows = [w for i in order for w in windows[2 * i : 2 * i + 2]] if windows else []
        weights = {k: getattr(site, f"{k}_proj").weight for k in ("q", "k", "v", "o")}
        if not reorder_is_exact(ctx.captured, call.node, weights, edits.apply, codes, new_codes, cache=checked,
                                windows=windows, new_windows=new_windows, added=added):
            ctx.notes.append(
                f"permute-heads: layer {site.layer} skipped (reordering heads changes the block's output: "
                "something between the projections and the heads depends on head order)"
            )
            ctx.count("layers_unpermuted")
            continue
        ctx.weight_edits.merge(edits)
        call.reorder_heads(order)
        ctx.count("layers_permuted")
        ctx.count("heads_moved", sum(1 for pos, h in enumerate(order) if pos != h))

