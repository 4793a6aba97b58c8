"""Distill stage, recording: each layer's attention inputs and original output, one layer at a time.

Design decisions:
- The original graph runs layer by layer (``analysis.layerwise``: weights read as their layer
  runs), and at each site whose layer is wanted the q, k, v and output of this process's
  calibration rows are kept (fp32, CPU) until the caller has used them (``sweep_records``), so
  memory is one layer's activations, never the model's.
- Under torch.distributed each process records its own rows (``calibration.local_rows``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hydracc.analysis.calibration import Calibration, local_rows
from hydracc.analysis.layerwise import Runner, Segment, compute_dtype, forward_sweep, split_by_layer
from hydracc.analysis.scores import calibration_batches, site_qkv
from hydracc.frontend.capture import CapturedModel

Weights = Mapping[str, Tensor] | Callable[[str], Tensor]
"""The model's weights by name, in memory or read on demand (``Inspection.read_weight``)."""


@dataclass
class SiteRecord:
    """One layer's attention inputs and original output on the calibration rows (fp32, CPU)."""

    q: Tensor  # [N, Hq, T, D]
    k: Tensor  # [N, Hkv, T, D]
    v: Tensor  # [N, Hkv, T, Dv]
    out: Tensor  # [N, Hq, T, Dv]


def runner_for(captured: CapturedModel, weights: Weights, device: Any = None, dtype: torch.dtype | None = None) -> Runner:
    """A layer-by-layer runner over ``weights`` on ``device`` (default: the weights', else the CPU)."""
    if isinstance(weights, Mapping):
        read: Callable[[str], Tensor] = weights.__getitem__
        values = list(weights.values())
        dev = torch.device(device) if device is not None else values[0].device
        dtypes = [t.dtype for t in values]
    else:
        read, dtypes = weights, []
        dev = torch.device(device) if device is not None else torch.device("cpu")
    return Runner(split_by_layer(captured, captured.graph_on(dev)), captured, read, dev, dtype or compute_dtype(dev, dtypes))


def sweep_records(
    runner: Runner,
    calibration: Calibration,
    layers: set[int],
    on_layer: Callable[[int, SiteRecord], None],
) -> None:
    """Run ``calibration`` (this process's rows) through the original model one layer at a time;
    after each wanted layer, hand its ``SiteRecord`` to ``on_layer`` and drop it."""
    sites = {s.layer: s for s in runner.captured.sites}
    batches = list(calibration_batches(calibration, runner.captured.input_shape[0]))
    parts: dict[int, list[tuple[Tensor, ...]]] = {layer: [] for layer in layers}
    count = {layer: 0 for layer in layers}

    def hook(layer: int, target: Any, args: tuple, kwargs: dict) -> Tensor:
        out = target(*args, **kwargs)
        if layer in parts:
            real = batches[count[layer]][1]
            count[layer] += 1
            q, k, v = site_qkv(args, kwargs)
            group = q.shape[1] // sites[layer].num_kv_heads
            k, v = k[:, ::group] if k.shape[1] == q.shape[1] else k, v[:, ::group] if v.shape[1] == q.shape[1] else v
            parts[layer].append(tuple(t[:real].detach().float().cpu() for t in (q, k, v, out)))
        return out

    def done(seg: Segment) -> None:
        if seg.layer in parts:
            chunks = parts.pop(seg.layer)
            on_layer(seg.layer, SiteRecord(*(torch.cat(ts) for ts in zip(*chunks))))

    last = max(layers) if layers else -1
    forward_sweep(runner, [ids for ids, _ in batches], hook, keep=False, on_segment=done,
                  until=runner.graph.layer(last).index if layers else 0)


def record_sites(captured: CapturedModel, weights: Weights, calibration: Calibration, layers: set[int], *,
                 device: Any = None, dtype: torch.dtype | None = None) -> dict[int, SiteRecord]:
    """q, k, v and output of the ``layers``' sites over ``calibration`` (all of them held at once)."""
    found: dict[int, SiteRecord] = {}
    sweep_records(runner_for(captured, weights, device, dtype), local_rows(calibration), set(layers), found.__setitem__)
    return found
