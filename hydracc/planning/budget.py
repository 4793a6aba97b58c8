"""Budgeted planning: choose which units (KV groups, or heads) stay full attention.

Design decisions:
- The unit is the KV group under grouped-query attention and the head otherwise
  (``analyze.units_of``): only a whole linear KV group frees cache. Each full unit costs
  one KV head's cache per token, ``2 * head_dim * element_bytes``.
- A budget is either a fraction of units (``full_ratio``) or a fraction of the original
  KV-cache bytes (``kv_budget``); both are turned into a byte budget and filled greedily
  in a strategy's priority order, so every strategy spends the same budget the same way:
  overrides first (``keep_full``), then each layer's minimum, then the priority order,
  skipping units that would break a layer's maximum or the budget. ``force_linear``
  units are never chosen.
- Strategies differ only in the priority order: ``heads`` by the analysis (by default its
  keep-first order: recall-critical units first, then KL, the cut line re-measured jointly;
  ``--score retrieval``/``linear_error`` rank by that head score instead), ``layers`` whole layers spread evenly
  over depth (the layer-wise hybrid baseline; a budget that is not a whole number of
  layers fills part of one more layer), ``random`` a permutation from ``seed`` (a
  control), ``even`` units spread evenly over layers and over units within a layer (no
  analysis; the spine's planner). Ties break by layer, then unit, so the same inputs and
  seed give the same plan.
- Scores go into the plan (``heads[i].scores``) and the budget section records how the
  plan was made, so a plan file explains itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hydracc.analysis.scores import Analysis, units_of
from hydracc.errors import PlanError
from hydracc.frontend.capture import AttentionSite
from hydracc.kernels.kinds import kind_by_name
from hydracc.planning.plan import HeadPlan, LayerPlan, Plan, model_summary

STRATEGIES = ("heads", "layers", "random", "even")
RANKING_SCORES = ("sensitivity", "retrieval", "linear_error")


@dataclass(frozen=True)
class Budget:
    """How much full attention a plan may keep; exactly one of the two fractions is set."""

    full_ratio: float | None = None
    kv_budget: float | None = None
    min_per_layer: int = 0
    max_per_layer: int | None = None

    def __post_init__(self) -> None:
        if (self.full_ratio is None) == (self.kv_budget is None):
            raise PlanError("give exactly one budget: --full-ratio or --kv-budget")
        for name, value in (("--full-ratio", self.full_ratio), ("--kv-budget", self.kv_budget)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise PlanError(f"{name} must be between 0 and 1, got {value}")
        if self.min_per_layer < 0:
            raise PlanError(f"--min-full-per-layer must be >= 0, got {self.min_per_layer}")
        if self.max_per_layer is not None and self.max_per_layer < self.min_per_layer:
            raise PlanError(f"--max-full-per-layer ({self.max_per_layer}) is below --min-full-per-layer ({self.min_per_layer})")


def spread(count: int, total: int) -> list[int]:
    """``count`` indices out of ``range(total)``, spread evenly (deterministic)."""
    if count <= 0:
        return []
    return sorted({(i * total) // count for i in range(count)})


@dataclass(frozen=True)
class Unit:
    layer: int
    index: int
    heads: tuple[int, ...]
    cost: int
    """KV-cache bytes per token that keeping this unit full costs."""


def parse_head_names(names: Sequence[str], sites: Sequence[AttentionSite], option: str) -> set[tuple[int, int]]:
    """``LAYER.HEAD`` names (query heads) -> ``{(layer, unit)}``; errors name the bad entry."""
    by_layer = {s.layer: s for s in sites}
    out: set[tuple[int, int]] = set()
    for raw in names:
        for name in filter(None, (x.strip() for x in raw.split(","))):
            m = re.fullmatch(r"(\d+)\.(\d+)", name)
            if not m:
                raise PlanError(f"{option} {name!r}: expected LAYER.HEAD, for example 3.5 (layer 3, query head 5)")
            layer, head = int(m.group(1)), int(m.group(2))
            site = by_layer.get(layer)
            if site is None:
                raise PlanError(f"{option} {name}: the model has no layer {layer} (layers {min(by_layer)}-{max(by_layer)})")
            if head >= site.num_heads:
                raise PlanError(f"{option} {name}: layer {layer} has {site.num_heads} query heads (0-{site.num_heads - 1})")
            unit = next(u for u, heads in enumerate(units_of(site)) if head in heads)
            out.add((layer, unit))
    return out


def _names(raw: Sequence[str]) -> list[str]:
    """``--keep-full``/``--force-linear`` values as given (``"0.1, 1.2"`` allowed) -> one ``layer.head`` per item."""
    return [name for item in raw for name in filter(None, (x.strip() for x in item.split(",")))]


def _units(sites: Sequence[AttentionSite], element_bytes: int) -> list[Unit]:
    units: list[Unit] = []
    for s in sorted(sites, key=lambda s: s.layer):
        for u, heads in enumerate(units_of(s)):
            units.append(Unit(s.layer, u, tuple(heads), 2 * s.head_dim * element_bytes))
    return units


def _priority(strategy: str, units: list[Unit], analysis: Analysis | None, score: str, seed: int, budget_units: int) -> list[Unit]:
    if strategy == "heads":
        if analysis is None:
            raise PlanError("the 'heads' strategy needs head scores (run the analysis, or pick --strategy layers/random/even)")

        if score == "sensitivity" and all(analysis.layer(u.layer).unit_priority for u in units):
            # the analysis's keep-first order: its objective (recall first by default), then the joint
            # re-measurement at the cut line (``analysis/select.py``)
            return sorted(units, key=lambda u: (analysis.layer(u.layer).unit_priority[u.index], u.layer, u.index))

        def unit_score(u: Unit) -> float:
            ls = analysis.layer(u.layer)
            if score == "sensitivity":
                return ls.unit_sensitivity[u.index]
            return max(getattr(ls.heads[h], score) for h in u.heads)

        return sorted(units, key=lambda u: (-unit_score(u), u.layer, u.index))
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(units))
        return [units[i] for i in order]
    layers = sorted({u.layer for u in units})
    per_layer = {layer: [u for u in units if u.layer == layer] for layer in layers}
    if strategy == "layers":
        size = max(len(v) for v in per_layer.values())
        n_layers = min(len(layers), math.ceil(budget_units / size)) if budget_units else 0
        chosen = [layers[((2 * i + 1) * len(layers)) // (2 * n_layers)] for i in range(n_layers)] if n_layers else []
        rest = [layer for layer in layers if layer not in chosen]
        return [u for layer in chosen + rest for u in per_layer[layer]]
    if strategy == "even":
        # Layer shares in proportion to size (Bresenham), then units spread within a layer.
        total, cum, first, second = len(units), 0, [], []
        for layer in layers:
            lu = per_layer[layer]
            share = (budget_units * (cum + len(lu))) // total - (budget_units * cum) // total if total else 0
            cum += len(lu)
            picked = set(spread(min(share, len(lu)), len(lu)))
            first += [u for u in lu if u.index in picked]
            second += [u for u in lu if u.index not in picked]
        return first + second
    raise PlanError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")


def make_budget_plan(
    sites: Sequence[AttentionSite],
    model_type: str,
    budget: Budget,
    *,
    strategy: str = "heads",
    analysis: Analysis | None = None,
    score: str = "sensitivity",
    keep_full: Sequence[str] = (),
    force_linear: Sequence[str] = (),
    linear_kind: str = "elu",
    seed: int = 0,
    element_bytes: int = 2,
    kind_params: dict[str, int] | None = None,
    fusion: bool = False,
) -> Plan:
    """A plan that keeps as many units full as ``budget`` allows, chosen by ``strategy``.

    Heads not kept full become ``linear_kind`` (with ``kind_params``, e.g. a streaming head's
    ``sink`` and ``window``); ``fusion`` asks for scale-normalized fusion on linear heads.
    """
    try:
        kind = kind_by_name(linear_kind)
    except KeyError as err:
        raise PlanError(f"--linear-kind: {err.args[0]}") from None
    if kind.keeps_kv:
        raise PlanError(f"--linear-kind must be a kind that frees the KV cache, got {linear_kind!r}")
    params = dict(kind_params or {})
    unknown = sorted(set(params) - set(kind.plan_params))
    if unknown:
        raise PlanError(f"head kind {kind.name!r} takes {', '.join(kind.plan_params) or 'no parameters'}; got {', '.join(unknown)}")
    params = {**kind.plan_defaults, **params}
    for name, (low, high) in kind.plan_ranges.items():
        if not low <= params[name] <= high:
            raise PlanError(f"{kind.name} heads need --{name} from {low} to {high}, got {params[name]}")
    if score not in RANKING_SCORES:
        raise PlanError(f"--score must be one of {', '.join(RANKING_SCORES)}, got {score!r}")
    units = _units(sites, element_bytes)
    total_bytes = sum(s.num_kv_heads * 2 * s.head_dim * element_bytes for s in sites)
    if budget.full_ratio is not None:  # counted in units
        cap = math.floor(budget.full_ratio * len(units) + 0.5)

        def cost(u: Unit) -> int:
            return 1
    else:  # counted in KV-cache bytes per token
        cap = int(budget.kv_budget * total_bytes + 1e-9)  # type: ignore[operator]

        def cost(u: Unit) -> int:
            return u.cost
    budget_units, spent = 0, 0
    for c in sorted(cost(u) for u in units):
        if spent + c > cap:
            break
        spent, budget_units = spent + c, budget_units + 1
    keep = parse_head_names(keep_full, sites, "--keep-full")
    linear = parse_head_names(force_linear, sites, "--force-linear")
    both = keep & linear
    if both:
        layer, unit = sorted(both)[0]
        raise PlanError(f"unit {unit} of layer {layer} is named by both --keep-full and --force-linear")
    by_key = {(u.layer, u.index): u for u in units}
    chosen: list[Unit] = []
    used = 0
    count: dict[int, int] = {}

    def take(u: Unit) -> None:
        nonlocal used
        chosen.append(u)
        used += cost(u)
        count[u.layer] = count.get(u.layer, 0) + 1

    for key in sorted(keep):
        take(by_key[key])
    if used > cap:
        raise PlanError(
            f"--keep-full names {len(keep)} units, more than the budget allows ({budget_units} units)",
            hint="raise --full-ratio / --kv-budget or keep fewer heads full",
        )
    order = _priority(strategy, units, analysis, score, seed, budget_units)
    free = [u for u in order if (u.layer, u.index) not in keep and (u.layer, u.index) not in linear]
    # each layer's minimum, best-first in the strategy's order
    for layer in sorted({u.layer for u in units}):
        candidates = [u for u in free if u.layer == layer]
        if count.get(layer, 0) + len(candidates) < budget.min_per_layer:
            raise PlanError(
                f"--min-full-per-layer {budget.min_per_layer} cannot be met in layer {layer}: "
                f"--force-linear leaves it {count.get(layer, 0) + len(candidates)} unit(s)",
                hint="lower --min-full-per-layer or force fewer heads of that layer linear",
            )
        for u in candidates:
            if count.get(layer, 0) >= budget.min_per_layer:
                break
            if used + cost(u) > cap:
                raise PlanError(
                    f"--min-full-per-layer {budget.min_per_layer} does not fit the budget ({budget_units} units in all)",
                    hint="lower --min-full-per-layer or raise the budget",
                )
            take(u)
    taken = {(u.layer, u.index) for u in chosen}
    for u in free:
        if (u.layer, u.index) in taken:
            continue
        if budget.max_per_layer is not None and count.get(u.layer, 0) >= budget.max_per_layer:
            continue
        if used + cost(u) > cap:
            continue
        take(u)
        taken.add((u.layer, u.index))
    full_heads = {(u.layer, h) for u in chosen for h in u.heads}
    layers = []
    for s in sorted(sites, key=lambda s: s.layer):
        ls = analysis.layer(s.layer) if analysis is not None else None
        heads = []
        for h in range(s.num_heads):
            hp = HeadPlan("full") if (s.layer, h) in full_heads else HeadPlan(kind.name, dict(params))
            if ls is not None:
                hp.scores = ls.heads[h].to_json()
            heads.append(hp)
        layers.append(LayerPlan(s.layer, s.module, s.num_heads, s.num_kv_heads, heads))
    grouped = any(s.num_kv_heads < s.num_heads for s in sites)
    record = {
        "strategy": strategy,
        "full_ratio": budget.full_ratio,
        "kv_budget": budget.kv_budget,
        "linear_kind": kind.name,
        "linear_kind_params": params or None,
        "full_units": len(chosen),
        "total_units": len(units),
        "kv_fraction_used": round(sum(u.cost for u in chosen) / total_bytes, 6) if total_bytes else 0.0,
        "min_full_per_layer": budget.min_per_layer,
        "max_full_per_layer": budget.max_per_layer,
        "keep_full": _names(keep_full) or None,  # one layer.head per item, as the plan format holds them
        "force_linear": _names(force_linear) or None,
    }
    if strategy == "heads":
        record["score"] = score
        objective = (analysis.extra.get("objective") if analysis is not None else None) or {}
        if score == "sensitivity" and objective:
            record["objective"] = objective.get("name")
            if objective.get("fell_back_to_kl"):
                record["objective_fell_back_to_kl"] = objective["fell_back_to_kl"]
            decided = {lp: [] for lp in ("recall", "kl", "joint")}
            for u in chosen:
                why = analysis.layer(u.layer).unit_decided_by[u.index] if analysis.layer(u.layer).unit_decided_by else ""
                if why in decided:
                    decided[why].append(f"{u.layer}.{u.heads[0]}")
            record["full_decided_by"] = {k: v for k, v in decided.items() if v}
            if objective.get("stability") is not None and objective.get("cut") == len(chosen):
                record["stability"] = objective["stability"]
    if strategy == "random":
        record["seed"] = seed
    if analysis is not None:
        record["calibration"] = analysis.calibration
    record = {k: v for k, v in record.items() if v is not None}
    return Plan(layers, model=model_summary(sites, model_type), budget=record, unit="kv_group" if grouped else "head",
                fusion=fusion or kind.learned)


def ratio_plan(sites: Sequence[AttentionSite], model_type: str, *, full_ratio: float, linear_kind: str = "elu") -> Plan:
    """The simplest plan, no analysis: ``full_ratio`` of the units full, spread evenly (strategy ``even``)."""
    return make_budget_plan(sites, model_type, Budget(full_ratio=full_ratio), strategy="even", linear_kind=linear_kind)
