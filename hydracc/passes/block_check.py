"""Check numerically that reordering heads leaves an attention block's output unchanged.

Design decisions:
- ``permute-heads`` knows the q/k/v/o projections, but a model may put more between them
  and the heads (a norm over all head channels, an output gate, per-head buffers). Rather
  than trust a list of "safe" ops, the block is cut out of the graph (every node between
  the q/k/v matmuls and the o-projection matmul), run on random weights and inputs, then
  run again with the reorder applied to the recorded weights and head kinds. Equal
  outputs mean the reorder is exact for *any* weights; a difference means some tensor the
  pass does not move depends on head order, and the site is left unpermuted.
- Memory is one attention block's weights; blocks with the same structure are checked once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from hydracc.frontend.capture import CapturedModel, _on_device, reachable_nodes
from hydracc.passes.hybrid_call import HybridCall


def _matmul_for_weight(graph: fx.Graph, weight: str, targets: dict[str, str]) -> fx.Node | None:
    for node in graph.nodes:
        if node.op == "placeholder" and targets.get(node.name) == weight:
            users = [u for u in node.users if u.op == "call_function"]
            return users[0] if len(users) == 1 else None
    return None


def _random_like(val: Any, gen: torch.Generator) -> Any:
    if not isinstance(val, torch.Tensor):
        return val
    if not val.dtype.is_floating_point:
        return torch.zeros(val.shape, dtype=val.dtype)
    std = val.shape[-1] ** -0.5 if val.dim() == 2 else 1.0
    return (torch.randn(val.shape, generator=gen) * std).to(val.dtype)


class AttentionBlock:
    """The subgraph from the q/k/v matmuls to the o-projection matmul of one site."""

    def __init__(
        self, captured: CapturedModel, attention: fx.Node, weights: dict[str, str], added: dict[str, str] | None = None
    ) -> None:
        """``weights`` names the projection weights: keys ``q``, ``k``, ``v``, ``o``; ``added`` maps
        graph-module buffers of learned head parameters to their checkpoint names (they become inputs)."""
        added = added or {}
        gm, targets = captured.graph_module, captured.placeholder_targets
        starts = [_matmul_for_weight(gm.graph, weights[k], targets) for k in ("q", "k", "v")]
        end = _matmul_for_weight(gm.graph, weights["o"], targets)
        if end is None or any(s is None for s in starts):
            raise ValueError("projection matmuls not found")
        ancestors = reachable_nodes([end], lambda n: n.all_input_nodes)
        region = ancestors & reachable_nodes([s for s in starts if s is not None], lambda n: n.users)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[fx.Node] = []
        for node in gm.graph.nodes:
            if node not in region:
                continue
            for inp in node.all_input_nodes:
                if inp in env:
                    continue
                if inp.op == "get_attr" and inp.target not in added:
                    env[inp] = graph.node_copy(inp)
                else:
                    env[inp] = graph.placeholder(f"in_{inp.name}")
                    self.inputs.append(inp)
            env[node] = graph.node_copy(node, env.__getitem__)
        graph.output(env[end])
        self.attention = env[attention]
        self.module = fx.GraphModule(gm, graph)
        self.parameter_names = {
            i.name: added.get(str(i.target)) if i.op == "get_attr" else targets.get(i.name) for i in self.inputs
        }
        self.signature = tuple(
            (str(n.target), tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None)
            for n in graph.nodes
            if n.op == "call_function"
        )

    def run(self, inputs: list[Any], head_kinds: list[int] | None = None, head_windows: list[int] | None = None) -> torch.Tensor:
        if head_kinds is not None:
            call = HybridCall(self.attention)
            if head_windows is not None:
                call.set_kinds(head_kinds, windows=head_windows)
            else:
                call.set_kinds(head_kinds)
            self.module.recompile()
        return _on_device(self.module, torch.device("cpu"))(*inputs)


def reorder_is_exact(
    captured: CapturedModel,
    attention: fx.Node,
    weights: dict[str, str],
    apply_edits: Callable[[str, torch.Tensor], torch.Tensor],
    kinds: list[int],
    new_kinds: list[int],
    *,
    cache: dict[tuple, bool] | None = None,
    seed: int = 0,
    windows: list[int] | None = None,
    new_windows: list[int] | None = None,
    added: dict[str, str] | None = None,
) -> bool:
    """Whether the block gives the same output with reordered weights, kinds and windows (random data).

    ``added`` maps graph buffers of learned head parameters to checkpoint names, so they are
    randomized and reordered (by ``apply_edits``) like weights.
    """
    try:
        block = AttentionBlock(captured, attention, weights, added)
    except (ValueError, KeyError):
        return False
    key = (block.signature, tuple(kinds), tuple(new_kinds), tuple(windows or ()), tuple(new_windows or ()))
    if cache is not None and key in cache:
        return cache[key]
    gen = torch.Generator().manual_seed(seed)
    inputs = [_random_like(i.meta.get("val"), gen) for i in block.inputs]
    reordered = [
        apply_edits(name, x) if (name := block.parameter_names.get(i.name)) and isinstance(x, torch.Tensor) else x
        for i, x in zip(block.inputs, inputs)
    ]
    with torch.no_grad():
        before = block.run(inputs, kinds, windows).float()
        after = block.run(reordered, new_kinds, new_windows).float()
    scale = before.abs().max().clamp_min(1e-6)
    exact = bool(((after - before).abs().max() / scale) < 1e-4)
    if cache is not None:
        cache[key] = exact
    return exact
