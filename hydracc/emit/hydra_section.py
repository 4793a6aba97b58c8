"""Emit stage, config part: the ``hydra`` section of a converted config, built from the rewritten graph.

The section is derived from each ``hybrid_attention`` node (its head kinds in the final head order),
not from the plan, so what is saved is what the graph computes, whatever user passes did after
planning; the plan is kept alongside for the record. The format and its reader are in
``hydracc.runtime.hydra_config``.
"""

from __future__ import annotations

from typing import Any

from hydracc.frontend.capture import SITE_META
from hydracc.kernels.head_kinds import kind_by_code
from hydracc.passes.hybridize import hybrid_nodes
from hydracc.passes.manager import PassContext
from hydracc.passes.permute_heads import HEAD_ORDER_META
from hydracc.runtime.hydra_config import HYDRA_FORMAT_VERSION


def hydra_section(ctx: PassContext, passes: list[str], provenance: dict[str, Any]) -> dict[str, Any]:
    """Build the ``hydra`` config section from the rewritten graph in ``ctx``."""
    layers = []
    names = {attr: name for name, attr in ctx.added_params.items()}
    for node in hybrid_nodes(ctx.graph_module.graph):
        site = ctx.captured.site(node.meta[SITE_META])
        codes = list(node.args[3])
        layers.append(
            {
                "layer": site.layer,
                "module": site.module,
                "num_heads": site.num_heads,
                "num_kv_heads": site.num_kv_heads,
                "head_dim": site.head_dim,
                "scale": float(node.args[4]),
                "kinds": [kind_by_code(c).name for c in codes],
                "head_order": list(node.meta.get(HEAD_ORDER_META, range(len(codes)))),
                "head_windows": [int(w) for w in node.args[6]] if len(node.args) > 6 else [],
                "params": [names[str(p.target)] for p in node.args[5]],
            }
        )
    layers.sort(key=lambda entry: entry["layer"])
    return {
        "format_version": HYDRA_FORMAT_VERSION,
        "layers": layers,
        "plan": ctx.plan.to_json() if ctx.plan is not None else None,
        "passes": passes,
        "provenance": provenance,
    }
