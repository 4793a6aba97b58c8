"""Emit stage, config part: the ``hydra`` section of a converted config, built from the rewritten graph.

The section is derived from each ``hybrid_attention`` node (its head kinds in the final head order),
not from the plan, so what is saved is what the graph computes, whatever user passes did after
planning; the plan is kept alongside for the record. The format and its reader are in
``hydracc.runtime.hydra_config``.
"""

from __future__ import annotations

from typing import Any

from hydracc.passes.manager import PassContext
from hydracc.runtime.hydra_config import HYDRA_FORMAT_VERSION


def hydra_section(ctx: PassContext, passes: list[str], provenance: dict[str, Any]) -> dict[str, Any]:
    """Build the ``hydra`` config section from the rewritten graph in ``ctx``."""
    layers = []
    names = {attr: name for name, attr in ctx.added_params.items()}
    for call in ctx.hybrid_calls():
        site = ctx.captured.site(call.layer)
        layers.append(
            {
                "layer": site.layer,
                "module": site.module,
                "num_heads": site.num_heads,
                "num_kv_heads": site.num_kv_heads,
                "head_dim": site.head_dim,
                "scale": call.scale,
                "kinds": call.kinds,
                "head_order": call.head_order,
                "head_windows": call.raw_windows,
                "params": [names[target] for target in call.param_targets],
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
