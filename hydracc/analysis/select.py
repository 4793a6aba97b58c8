"""Which units to keep full first: the objective's ranking, then joint re-measurement at the cut line.

Design decisions:
- Objective ``recall`` (default): units whose recall score (the change of the cross-entropy at
  positions predictable only by copying) is at least ``RECALL_SHARE`` of the largest come
  first, by that score; the rest follow by KL. A model that does not itself recall (accuracy at
  its recall positions under ``MIN_RECALL_ACCURACY``, or fewer than ``MIN_RECALL_POSITIONS`` such
  positions) has nothing to protect: the plan says so and ranks by KL. Objective ``kl``: KL only.
- Circuits: a unit can look harmless alone and matter together with another (two redundant
  copy groups; a previous-token group feeding an induction group). So the ``window`` units
  around the cut line are re-measured together, in the plan's own context (units ranked above
  the window full, below it linear), by backward elimination: starting with the window full,
  the unit whose removal costs least is made linear, until the window holds the budget's share.
  The cost is measured exactly; for ``recall`` it is the recall cross-entropy change first, and
  among removals within ``RECALL_SHARE`` of the cheapest (a tie for recall) the one that costs
  least KL (so the budget left after recall goes by KL); for ``kl``, KL. Elimination keeps an AND-circuit (removing either half costs much)
  and one member of an OR-pair (the second removal costs much). Cost: ``k + (k-1) + ...``
  configurations, each one forward pass from the first linear layer, run layer-major together.
- The result is a priority order over all units (keep first); the planner fills the budget in
  that order, so its constraints (per-layer minimum/maximum, forced units) still hold.
- Stability, from per-row values already measured (no model runs): bootstrap resamples of the
  calibration rows re-rank the units and replay the elimination along the path it measured; a
  resample agrees when no round of it would make a kept unit linear (the order in which
  dropped units go does not matter). A resample whose ranking moves a unit across the window's
  edges counts as disagreeing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Unit = tuple[int, int]
"""``(layer, unit index)``."""

OBJECTIVES = ("recall", "kl")
RECALL_SHARE = 0.05
MIN_RECALL_ACCURACY = 0.05
MIN_RECALL_POSITIONS = 32


@dataclass
class Ranking:
    order: list[Unit]
    decided_by: dict[Unit, str]
    objective: str
    fell_back: str | None = None
    """Why the recall objective fell back to KL (``None`` when it did not)."""


def rank(units: Sequence[Unit], kl: dict[Unit, float], recall: dict[Unit, float], objective: str,
         recall_accuracy: float, recall_positions: int) -> Ranking:
    """The objective's order over ``units`` (keep first), and which score put each unit where it is."""
    by_kl = sorted(units, key=lambda u: (-kl[u], u))
    if objective == "kl":
        return Ranking(by_kl, {u: "kl" for u in units}, "kl")
    why = None
    if recall_positions < MIN_RECALL_POSITIONS:
        why = f"the calibration rows have {recall_positions} recall positions (fewer than {MIN_RECALL_POSITIONS})"
    elif recall_accuracy < MIN_RECALL_ACCURACY:
        why = (f"the original model predicts {recall_accuracy:.1%} of its recall positions (under "
               f"{MIN_RECALL_ACCURACY:.0%}): there is no recall to protect")
    if why is not None:
        return Ranking(by_kl, {u: "kl" for u in units}, "recall", fell_back=why)
    top = max((recall[u] for u in units), default=0.0)
    critical = [u for u in units if top > 0 and recall[u] >= RECALL_SHARE * top]
    first = sorted(critical, key=lambda u: (-recall[u], u))
    rest = [u for u in by_kl if u not in set(critical)]
    return Ranking(first + rest, {**{u: "recall" for u in first}, **{u: "kl" for u in rest}}, "recall")


Cost = tuple[float, float]
"""``(primary, secondary)`` loss of a configuration: (recall, KL) for ``recall``, (KL, KL) for ``kl``."""
Measure = Callable[[list[list[Unit]]], list[Cost]]
"""``measure(configurations)``: the objective's cost with each configuration's units made linear."""


def cheapest(costs: Sequence[Cost]) -> int:
    """The removal to make: least primary cost; among those within ``RECALL_SHARE`` of the largest
    primary magnitude of the least (a tie for recall), least secondary cost (KL)."""
    def finite(x: float) -> float:  # a non-finite cost (non-finite weights, --allow-nonfinite) is the worst
        return x if math.isfinite(x) else math.inf

    first = [finite(c[0]) for c in costs]
    low = min(first)
    tol = RECALL_SHARE * max((abs(x) for x in first if math.isfinite(x)), default=0.0)
    near = [i for i, x in enumerate(first) if x <= low + tol or not math.isfinite(low)]
    return min(near, key=lambda i: (finite(costs[i][1]), first[i], i))


@dataclass
class Elimination:
    kept: list[Unit]
    """Window units kept full, most costly to remove first."""
    removed: list[Unit]
    """Window units made linear, in the order they were removed."""
    costs: dict[Unit, Cost] = field(default_factory=dict)
    """The cost when the unit was (or would have been, at the end) removed."""
    runs: int = 0
    rounds: list[list[tuple[Unit, tuple[Unit, ...]]]] = field(default_factory=list)
    """Per round, each unit then full and the configuration measured for it (its units made linear)."""


def eliminate(window: Sequence[Unit], below: Sequence[Unit], keep: int, measure: Measure) -> Elimination:
    """Backward elimination over ``window`` until ``keep`` units remain full (see the module docstring).

    ``below``: units linear in every configuration (those ranked after the window)."""
    full = list(window)
    removed: list[Unit] = []
    costs: dict[Unit, Cost] = {}
    runs = 0
    rounds: list[list[tuple[Unit, tuple[Unit, ...]]]] = []
    while len(full) > keep:
        trials = [list(below) + removed + [u] for u in full]
        losses = measure(trials)
        rounds.append([(u, tuple(sorted(t))) for u, t in zip(full, trials)])
        runs += len(trials)
        costs.update(zip(full, losses))
        removed.append(full.pop(cheapest(losses)))
    kept = sorted(full, key=lambda u: (-costs.get(u, (0.0, 0.0))[0], u))
    return Elimination(kept, removed, costs, runs, rounds)


def priority(ranking: Ranking, window: Sequence[Unit], elimination: Elimination | None) -> tuple[list[Unit], dict[Unit, str]]:
    """The final keep-first order: the ranking, with the window's slots reordered by the elimination."""
    decided = dict(ranking.decided_by)
    if elimination is None or not window:
        return list(ranking.order), decided
    inside = set(window)
    start = min(ranking.order.index(u) for u in window)
    reordered = elimination.kept + list(reversed(elimination.removed))
    for u in window:
        decided[u] = "joint"
    outside = [u for u in ranking.order if u not in inside]
    return outside[:start] + reordered + outside[start:], decided


@dataclass
class Rows:
    """Per-row sums measured on the calibration rows, to re-weigh them without running the model."""

    positions: np.ndarray
    """``[rows]``: positions per row (the KL's denominator)."""
    recall: np.ndarray
    """``[rows]``: recall positions per row (the recall score's denominator)."""
    unit_kl: dict[Unit, np.ndarray]
    unit_recall: dict[Unit, np.ndarray]
    configurations: dict[tuple[Unit, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Joint configurations measured: per row, the KL sum and the recall cross-entropy change sum."""


@dataclass
class Stability:
    agree: float
    """Share of resamples that keep the same units full at the cut."""
    resamples: int
    margin: dict | None
    """The last unit kept and the first dropped, the score that ordered them and their values."""

    def to_json(self) -> dict:
        return {"agree": round(self.agree, 4), "resamples": self.resamples, "margin": self.margin}


def _mean(rows: np.ndarray, weights: np.ndarray, idx: np.ndarray) -> float:
    den = float(weights[idx].sum())
    return float(rows[idx].sum()) / den if den else 0.0


def stability(ranking: Ranking, final: Sequence[Unit], at: int, rows: Rows, *, window: Sequence[Unit] = (),
              elimination: Elimination | None = None, use_recall: bool = True, accuracy: float = 1.0,
              resamples: int = 200, seed: int = 0, name: Callable[[Unit], str] = lambda u: f"{u[0]}.{u[1]}") -> Stability:
    """How often bootstrap resamples of the rows reproduce the units kept at ``at`` (module docstring).

    ``name`` labels the margin's units (the caller's ``layer.head``; default ``layer.unit``)."""
    units = list(ranking.order)
    n = len(rows.positions)
    reference = set(final[:at])
    lo = ranking.order.index(window[0]) if window else 0
    above, inside = set(ranking.order[:lo]), set(window)
    rng = np.random.default_rng(seed)
    agree = 0
    for _ in range(resamples if n > 1 else 0):
        idx = rng.integers(0, n, n)
        kl = {u: _mean(rows.unit_kl[u], rows.positions, idx) for u in units}
        rec = {u: _mean(rows.unit_recall[u], rows.recall, idx) for u in units}
        r = rank(units, kl, rec, ranking.objective, accuracy, int(rows.recall[idx].sum()) if ranking.fell_back is None
                 else 0)
        if elimination is None or not window:
            agree += set(r.order[:at]) == reference
            continue
        if set(r.order[:lo]) != above or set(r.order[lo : lo + len(window)]) != inside:
            continue
        same = True
        kept = set(final[:at])
        for measured in elimination.rounds:  # along the measured path: would a resample drop a kept unit?
            costs = []
            for _, cfg in measured:
                kl_rows, ce_rows = rows.configurations[cfg]
                kl_mean = _mean(kl_rows, rows.positions, idx)
                costs.append((_mean(ce_rows, rows.recall, idx) if use_recall else kl_mean, kl_mean))
            if measured[cheapest(costs)][0] in kept:
                same = False
                break
        agree += same
    return Stability(agree / resamples if n > 1 else 1.0, resamples if n > 1 else 0, _margin(ranking, final, at, rows,
                                                                                         elimination, window, name))


def _margin(ranking: Ranking, final: Sequence[Unit], at: int, rows: Rows, elimination: Elimination | None,
            window: Sequence[Unit], name: Callable[[Unit], str]) -> dict | None:
    if not 0 < at < len(final):
        return None
    kept, dropped = final[at - 1], final[at]
    if elimination is not None and kept in window and dropped in window:
        a, b = elimination.costs.get(kept, (0.0, 0.0))[0], elimination.costs.get(dropped, (0.0, 0.0))[0]
        score = "joint recall loss when made linear" if ranking.objective == "recall" and ranking.fell_back is None else (
            "joint KL when made linear")
    elif ranking.decided_by.get(kept) == ranking.decided_by.get(dropped) == "recall":
        a, b = _mean(rows.unit_recall[kept], rows.recall, slice(None)), _mean(rows.unit_recall[dropped], rows.recall, slice(None))
        score = "recall"
    elif ranking.decided_by.get(kept) == ranking.decided_by.get(dropped) == "kl":
        a, b = _mean(rows.unit_kl[kept], rows.positions, slice(None)), _mean(rows.unit_kl[dropped], rows.positions, slice(None))
        score = "kl"
    else:
        return {"kept": name(kept), "dropped": name(dropped), "score": "recall first, then kl (not comparable)"}
    return {"kept": name(kept), "dropped": name(dropped), "score": score, "kept_value": round(a, 6),
            "dropped_value": round(b, 6), "relative": round((a - b) / abs(a), 4) if a else None}
