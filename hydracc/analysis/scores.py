"""Analyze stage: run calibration data through the captured graph and score every head.

Design decisions:
- The captured, not yet rewritten, graph runs under an ``fx.Interpreter`` that stops at
  each attention site (the SDPA node marked by capture) and hands its q, k, v to the
  scorer; nothing else of the model is re-implemented, so any family capture accepts can
  be analyzed. The graph is captured at the calibration shape ``[batch, seq_len]``.
- Per query head, from its attention probabilities on the calibration batch:
  ``retrieval`` (attention mass on positions right after an earlier occurrence of the
  current token, minus what a uniform head would put there: the induction / copy
  pattern of the Retrieval Head literature; 1 for a perfect copier, about 0 for uniform),
  ``distance`` (mean attended distance in tokens), ``sink`` (mass on the first token),
  ``entropy`` (normalized by ``log(position + 1)``, so 1 is uniform), and
  ``linear_error`` (relative L2 error of the linear kind's output on the same q, k, v).
- ``sensitivity``: KL(original || variant) of the next-token distribution, mean over all
  calibration positions, with one unit made linear and everything else unchanged. The
  unit is the KV group under grouped-query attention (only whole groups free cache),
  the head otherwise; every head of a group carries the group's value. One graph run per
  unit and calibration batch, recomputing only the part of the graph after the changed site
  (the values before it come from the baseline run); one batch's logits are held at a time.
- Per-head sums are added up in float64 across batches; the same inputs and batch size give
  the same scores, and another batch size changes them only by float rounding (the model's
  own matmuls round differently per batch shape). Attention probabilities are computed one
  head at a time, so memory is ``[batch, T, T]`` per head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from hydracc.analysis.calibration import Calibration
from hydracc.frontend.capture import SITE_META, AttentionSite, CapturedModel, reachable_nodes
from hydracc.kernels.kinds import kind_by_name
from hydracc.kernels.naive import run_kind

SCORE_NAMES = ("retrieval", "distance", "sink", "entropy", "linear_error", "sensitivity")


@dataclass
class HeadScores:
    retrieval: float = 0.0
    distance: float = 0.0
    sink: float = 0.0
    entropy: float = 0.0
    linear_error: float = 0.0
    sensitivity: float = 0.0

    def to_json(self, digits: int = 6) -> dict[str, float]:
        return {k: round(float(v), digits) for k, v in asdict(self).items()}


@dataclass
class LayerScores:
    layer: int
    module: str
    num_heads: int
    num_kv_heads: int
    heads: list[HeadScores]
    unit_sensitivity: list[float]
    """KL per unit: per KV group under GQA, per head otherwise."""

    @property
    def grouped(self) -> bool:
        return self.num_kv_heads < self.num_heads


@dataclass
class Analysis:
    layers: list[LayerScores]
    calibration: dict[str, Any]
    linear_kind: str
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)

    def layer(self, index: int) -> LayerScores:
        for ls in self.layers:
            if ls.layer == index:
                return ls
        raise KeyError(index)

    def to_json(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration,
            "linear_kind": self.linear_kind,
            **self.extra,
            "unit": self.unit,
            "layers": [
                {
                    "layer": ls.layer,
                    "module": ls.module,
                    "num_heads": ls.num_heads,
                    "num_kv_heads": ls.num_kv_heads,
                    "unit_sensitivity": [round(x, 6) for x in ls.unit_sensitivity],
                    "heads": [h.to_json() for h in ls.heads],
                }
                for ls in self.layers
            ],
        }


class SiteInterpreter(fx.Interpreter):
    """Runs the graph, sending every attention site through ``hook(layer, target, args, kwargs)``."""

    def __init__(self, gm: fx.GraphModule, hook: Callable[[int, Any, tuple, dict], torch.Tensor]) -> None:
        super().__init__(gm)
        self.hook = hook

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.meta.get(SITE_META) is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self.hook(n.meta[SITE_META], n.target, args, kwargs)
        return super().run_node(n)


class _RecordingInterpreter(SiteInterpreter):
    """A ``SiteInterpreter`` that also keeps the values of the nodes in ``keep``."""

    def __init__(self, gm: fx.GraphModule, hook: Callable[[int, Any, tuple, dict], torch.Tensor], keep: set[fx.Node]) -> None:
        super().__init__(gm, hook)
        self.keep = keep
        self.saved: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.keep:
            self.saved[n] = value
        return value


class _ResumingInterpreter(SiteInterpreter):
    """Recomputes only ``downstream`` nodes; every other node takes its value from ``saved``."""

    def __init__(self, gm: fx.GraphModule, hook: Callable[[int, Any, tuple, dict], torch.Tensor],
                 downstream: set[fx.Node], saved: dict[fx.Node, Any]) -> None:
        super().__init__(gm, hook)
        self.downstream = downstream
        self.saved = saved

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder" or n in self.downstream:
            return super().run_node(n)
        return self.saved.get(n)  # None for nodes no recomputed node reads


def _prefix_plan(gm: fx.GraphModule) -> tuple[dict[int, set[fx.Node]], dict[int, set[fx.Node]]] | None:
    """Per site: the nodes that depend on it, and the other nodes those read. ``None`` if unsafe.

    Reusing the values computed before a site is only safe when no op writes into its inputs.
    """
    nodes = list(gm.graph.nodes)
    for n in nodes:
        target = n.target
        if n.op == "call_function" and isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            return None
    downstream: dict[int, set[fx.Node]] = {}
    frontier: dict[int, set[fx.Node]] = {}
    for n in nodes:
        layer = n.meta.get(SITE_META) if n.op == "call_function" else None
        if layer is None:
            continue
        down = reachable_nodes([n], lambda m: m.users)
        downstream[layer] = down
        frontier[layer] = {a for m in down for a in m.all_input_nodes if a not in down and a.op != "placeholder"}
    return downstream, frontier


def site_qkv(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k, v an attention site's SDPA call received (positionally or by keyword)."""
    q = args[0] if len(args) > 0 else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    return q, k, v


def calibration_batches(calibration: Calibration, batch: int) -> Iterator[tuple[torch.Tensor, int]]:
    """``(ids [batch, seq_len], real)`` per graph run: a short last batch is padded with repeated
    rows, of which only the first ``real`` count (rows do not interact, so padding changes nothing)."""
    seq_len = calibration.seq_len
    for start in range(0, calibration.samples, batch):
        rows = calibration.tokens[start : start + batch]
        real = len(rows)
        if real < batch:
            rows = np.concatenate([rows, np.resize(calibration.tokens, (batch - real, seq_len))])
        yield torch.from_numpy(np.ascontiguousarray(rows)).long(), real


def graph_logits(out: Any) -> torch.Tensor:
    """The logits from a captured graph's output (a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _qkv(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = site_qkv(args, kwargs)
    if k.shape[1] != q.shape[1]:  # SDPA called with enable_gqa: expand here
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return q, k, v


def retrieval_targets(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]`` bool: key position p is a copy target for query t (p < t, token[p-1] == token[t])."""
    b, t = tokens.shape
    prev = torch.cat([tokens.new_full((b, 1), -1), tokens[:, :-1]], dim=1)  # token before each key position
    match = tokens[:, :, None] == prev[:, None, :]
    return match & torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril(-1)


class _Accumulator:
    """Per-head sums over calibration samples (float64)."""

    def __init__(self, heads: int) -> None:
        self.sums = {name: np.zeros(heads) for name in ("retrieval", "distance", "sink", "entropy")}
        self.counts = {name: 0.0 for name in self.sums}
        self.err_num = np.zeros(heads)
        self.err_den = np.zeros(heads)

    def add(
        self, probs: torch.Tensor, targets: torch.Tensor, sdpa_out: torch.Tensor, linear_out: torch.Tensor, first: int = 0
    ) -> None:
        """probs ``[B, h, T, T]`` fp32 (causal) for heads ``first .. first+h``, targets ``[B, T, T]``, outputs ``[B, h, T, Dv]``."""
        b, h, t, _ = probs.shape
        sl = slice(first, first + h)
        pos = torch.arange(t, dtype=torch.float32)
        dist = (pos[:, None] - pos[None, :]).clamp(min=0)
        self.sums["distance"][sl] += (probs * dist).sum(-1).sum((0, 2)).double().numpy()
        if first == 0:  # counts are per position, the same for every head
            self.counts["distance"] += b * t
        self.sums["sink"][sl] += probs[..., 0].sum((0, 2)).double().numpy()
        if first == 0:
            self.counts["sink"] += b * t
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [B, H, T]
        norm = (pos + 1).log()
        self.sums["entropy"][sl] += (ent[..., 1:] / norm[1:]).sum((0, 2)).double().numpy()
        if first == 0:
            self.counts["entropy"] += b * (t - 1)
        tf = targets.float()
        n_targets = tf.sum(-1)  # [B, T]
        valid = n_targets > 0
        mass = (probs * tf[:, None]).sum(-1)  # [B, H, T]
        excess = mass - (n_targets / (pos + 1))[:, None]
        self.sums["retrieval"][sl] += (excess * valid[:, None]).sum((0, 2)).double().numpy()
        if first == 0:
            self.counts["retrieval"] += float(valid.sum())
        so, lo = sdpa_out.float(), linear_out.float()
        self.err_num[sl] += ((lo - so).double() ** 2).sum((0, 2, 3)).numpy()
        self.err_den[sl] += (so.double() ** 2).sum((0, 2, 3)).numpy()

    def scores(self) -> list[HeadScores]:
        mean = {k: self.sums[k] / max(self.counts[k], 1.0) for k in self.sums}
        err = np.sqrt(self.err_num / np.maximum(self.err_den, 1e-30))
        return [
            HeadScores(
                retrieval=float(mean["retrieval"][i]),
                distance=float(mean["distance"][i]),
                sink=float(mean["sink"][i]),
                entropy=float(mean["entropy"][i]),
                linear_error=float(err[i]),
            )
            for i in range(len(err))
        ]


def _causal_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    t = q.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def units_of(site: AttentionSite) -> list[list[int]]:
    """The planning units of a site: its KV groups under GQA, its single heads otherwise."""
    if site.num_kv_heads < site.num_heads:
        g = site.num_heads // site.num_kv_heads
        return [list(range(u * g, (u + 1) * g)) for u in range(site.num_kv_heads)]
    return [[h] for h in range(site.num_heads)]


def analyze(
    captured: CapturedModel,
    weights: dict[str, torch.Tensor],
    calibration: Calibration,
    *,
    linear_kind: str = "elu",
    kind_params: dict[str, int] | None = None,
    sensitivity: bool = True,
    reuse_prefix: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Score every head of every attention site of ``captured`` on ``calibration``.

    ``captured`` must have been captured at ``[batch, calibration.seq_len]``; ``weights``
    maps the model's parameter names to tensors (all on one device). The calibration rows
    are processed ``batch`` at a time; a short last batch is padded with repeated rows
    that are not counted. With ``reuse_prefix`` a sensitivity run recomputes only what
    depends on the changed site, reading everything before it from the baseline run (kept:
    the values those later nodes read, about one residual stream per layer).
    """
    kind = kind_by_name(linear_kind)
    if kind.keeps_kv:
        raise ValueError(f"linear_kind must be a kind that frees the KV cache, got {linear_kind!r}")
    # learned kinds are untrained at analysis time: score them as the parameter-free elu kind
    scored = kind_by_name("elu") if kind.learned else kind
    window = {k: int(v) for k, v in (kind_params or {}).items() if k in ("sink", "window")}
    if scored.name == "streaming":
        from hydracc.planning.plan import STREAMING_DEFAULTS

        window = {**STREAMING_DEFAULTS, **window}

    def run_scored(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return run_kind(scored.code, q, k, v, scale, **window)

    batch, seq_len = captured.input_shape
    if calibration.seq_len != seq_len:
        raise ValueError(f"graph captured for length {seq_len}, calibration rows have {calibration.seq_len}")
    device = next(iter(weights.values())).device
    gm = captured.graph_on(device)
    sites = {s.layer: s for s in captured.sites}
    acc = {layer: _Accumulator(s.num_heads) for layer, s in sites.items()}
    units = {layer: units_of(s) for layer, s in sites.items()}
    kl_sums = {layer: np.zeros(len(u)) for layer, u in units.items()}
    n_rows = calibration.samples
    n_batches = math.ceil(n_rows / batch)
    variants = [(layer, u) for layer in sorted(units) for u in range(len(units[layer]))] if sensitivity else []
    total, done = n_batches * (1 + len(variants)), 0
    positions = 0
    prefix = _prefix_plan(gm) if reuse_prefix and variants else None
    keep = set().union(*prefix[1].values()) if prefix is not None else set()

    def report() -> None:
        if progress is not None:
            progress(done, total)

    report()
    with torch.no_grad():
        for ids, real in calibration_batches(calibration, batch):
            ids = ids.to(device)
            targets = retrieval_targets(ids[:real]).cpu()
            inputs = captured.graph_inputs(weights, ids)

            def score_hook(layer: int, target: Any, args: tuple, kwargs: dict, _real=real, _targets=targets) -> torch.Tensor:
                out = target(*args, **kwargs)
                q, k, v = _qkv(args, kwargs)
                site = sites[layer]
                q, k, v = q[:_real], k[:_real], v[:_real]
                lin = run_scored(q.float(), k.float(), v.float(), site.scale)
                for h in range(q.shape[1]):  # one head at a time: memory is [B, T, T], not [B, H, T, T]
                    probs = _causal_probs(q[:, h : h + 1], k[:, h : h + 1], site.scale)
                    acc[layer].add(probs.cpu(), _targets, out[:_real, h : h + 1].cpu(), lin[:, h : h + 1].cpu(), first=h)
                return out

            recorder = _RecordingInterpreter(gm, score_hook, keep)
            base = graph_logits(recorder.run(*inputs))[:real]
            base_logp = F.log_softmax(base.float(), dim=-1)
            positions += base_logp.shape[0] * base_logp.shape[1]
            done += 1
            report()
            for layer, u in variants:
                heads = units[layer][u]

                def variant_hook(site_layer: int, target: Any, args: tuple, kwargs: dict, _layer=layer, _heads=heads) -> torch.Tensor:
                    out = target(*args, **kwargs)
                    if site_layer != _layer:
                        return out
                    q, k, v = _qkv(args, kwargs)
                    idx = torch.tensor(_heads, device=q.device)
                    lin = run_scored(q.index_select(1, idx).float(), k.index_select(1, idx).float(),
                                     v.index_select(1, idx).float(), sites[site_layer].scale)
                    return out.index_copy(1, idx, lin.to(out.dtype))

                if prefix is not None:
                    runner: SiteInterpreter = _ResumingInterpreter(gm, variant_hook, prefix[0][layer], recorder.saved)
                else:
                    runner = SiteInterpreter(gm, variant_hook)
                logits = graph_logits(runner.run(*inputs))[:real]
                logp = F.log_softmax(logits.float(), dim=-1)
                kl = (torch.special.xlogy(base_logp.exp(), base_logp.exp()) - base_logp.exp() * logp.clamp_min(-1e30)).sum(-1)
                kl_sums[layer][u] += float(kl.double().sum())
                done += 1
                report()

    layers = []
    for layer in sorted(sites):
        site = sites[layer]
        heads = acc[layer].scores()
        unit_kl = [float(x / max(positions, 1)) for x in kl_sums[layer]] if sensitivity else [0.0] * len(units[layer])
        for u, members in enumerate(units[layer]):
            for h in members:
                heads[h].sensitivity = unit_kl[u]
        layers.append(LayerScores(layer, site.module, site.num_heads, site.num_kv_heads, heads, unit_kl))
    grouped = any(s.num_kv_heads < s.num_heads for s in sites.values())
    extra = {"scored_as": scored.name, **window} if scored is not kind or window else {}
    return Analysis(layers, calibration.describe(), kind.name, "kv_group" if grouped else "head", extra)


