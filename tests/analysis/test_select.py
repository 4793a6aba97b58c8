"""The keep-first order: recall first (or KL), and backward elimination that keeps circuits together."""

from __future__ import annotations

import numpy as np

from hydracc.analysis.select import Rows, eliminate, priority, rank, stability

A, B, C, D, E = (0, 0), (0, 1), (1, 0), (1, 1), (2, 0)


def _loss(table):
    def measure(configs):
        return [(table(set(c)),) * 2 for c in configs]
    return measure


def test_an_or_pair_keeps_one_member() -> None:
    """A and B do the same job: either alone is harmless to lose, both together are not."""
    small = {C: 0.1, D: 0.2}

    def loss(linear):
        return (1.0 if {A, B} <= linear else 0.0) + sum(small.get(u, 0.0) for u in linear)

    out = eliminate([A, B, C, D], [], keep=2, measure=_loss(loss))
    assert len({A, B} & set(out.kept)) == 1 and D in out.kept
    assert out.runs == 4 + 3


def test_an_and_circuit_is_kept_whole() -> None:
    """A feeds B: losing either breaks the circuit."""
    small = {C: 0.1, D: 0.2}

    def loss(linear):
        return (1.0 if linear & {A, B} else 0.0) + sum(small.get(u, 0.0) for u in linear)

    out = eliminate([A, B, C, D], [], keep=2, measure=_loss(loss))
    assert set(out.kept) == {A, B} and out.removed == [C, D]


def test_units_below_the_window_are_linear_in_every_configuration() -> None:
    seen = []

    def measure(configs):
        seen.extend(configs)
        return [(float(len(c)),) * 2 for c in configs]

    eliminate([A, B], [E], keep=1, measure=measure)
    assert seen and all(E in c for c in seen)


def test_recall_first_then_kl_and_the_fallback() -> None:
    units = [A, B, C, D]
    kl = {A: 0.9, B: 0.1, C: 0.5, D: 0.2}
    recall = {A: 0.0, B: 1.0, C: 0.001, D: 0.3}
    r = rank(units, kl, recall, "recall", recall_accuracy=0.8, recall_positions=500)
    assert r.order == [B, D, A, C] and r.decided_by[B] == "recall" and r.decided_by[A] == "kl" and r.fell_back is None
    assert rank(units, kl, recall, "kl", 0.8, 500).order == [A, C, D, B]
    weak = rank(units, kl, recall, "recall", recall_accuracy=0.01, recall_positions=500)
    assert weak.order == [A, C, D, B] and "no recall to protect" in weak.fell_back
    few = rank(units, kl, recall, "recall", recall_accuracy=0.9, recall_positions=3)
    assert few.fell_back and "recall positions" in few.fell_back


def test_priority_reorders_only_the_window() -> None:
    r = rank([A, B, C, D, E], {A: 5, B: 4, C: 3, D: 2, E: 1}, {u: 0.0 for u in (A, B, C, D, E)}, "kl", 1.0, 100)
    out = eliminate([B, C, D], [E], keep=1, measure=_loss(lambda linear: 1.0 if C in linear else 0.0))
    order, decided = priority(r, [B, C, D], out)
    assert order[0] == A and order[1] == C and order[-1] == E and set(order[2:4]) == {B, D}
    assert decided[C] == "joint" and decided[A] == "kl"


def _rows(kl_rows: dict, recall_rows: dict, n: int) -> Rows:
    return Rows(np.full(n, 10.0), np.full(n, 2.0), {u: np.asarray(v, float) for u, v in kl_rows.items()},
                {u: np.asarray(v, float) for u, v in recall_rows.items()})


def test_stability_is_one_when_every_row_agrees_and_drops_when_rows_disagree() -> None:
    n = 40
    units = [A, B, C, D]
    steady = _rows({A: [5.0] * n, B: [1.0] * n, C: [3.0] * n, D: [2.0] * n}, {u: [0.0] * n for u in units}, n)
    r = rank(units, {u: steady.unit_kl[u].mean() / 10 for u in units}, {u: 0.0 for u in units}, "kl", 1.0, 80)
    sure = stability(r, r.order, 2, steady)
    assert sure.agree == 1.0 and sure.resamples == 200
    assert sure.margin["kept"] == "1.0" and sure.margin["dropped"] == "1.1" and sure.margin["relative"] > 0
    # C and D are a coin toss: half the rows rank C above D, half the other way round, nearly equal on average
    rng = np.random.default_rng(0)
    c = np.where(np.arange(n) % 2 == 0, 4.0, 1.0) + rng.normal(0, 0.01, n)
    d = np.where(np.arange(n) % 2 == 0, 1.0, 4.0) + rng.normal(0, 0.01, n)
    toss = _rows({A: [5.0] * n, B: [0.5] * n, C: c, D: d}, {u: [0.0] * n for u in units}, n)
    r = rank(units, {u: toss.unit_kl[u].mean() / 10 for u in units}, {u: 0.0 for u in units}, "kl", 1.0, 80)
    unsure = stability(r, r.order, 2, toss)
    assert 0.2 < unsure.agree < 0.8


def test_stability_replays_the_elimination_on_the_configurations_it_measured() -> None:
    n = 30
    units = [A, B, C]
    per_row = {A: np.full(n, 1.0), B: np.full(n, 2.0), C: np.full(n, 3.0)}
    rows = _rows(per_row, {u: np.zeros(n) for u in units}, n)

    def measure(configs):
        out = []
        for cfg in configs:
            k = np.sum([per_row[u] for u in cfg], 0)
            rows.configurations[tuple(sorted(cfg))] = (k, np.zeros(n))
            out.append((float(k.sum() / (10.0 * n)),) * 2)
        return out

    r = rank(units, {u: per_row[u].mean() / 10 for u in units}, {u: 0.0 for u in units}, "kl", 1.0, 60)
    elim = eliminate(r.order, [], keep=1, measure=measure)
    final, _ = priority(r, r.order, elim)
    assert final[0] == C and elim.rounds and len(elim.rounds[0]) == 3
    assert stability(r, final, 1, rows, window=r.order, elimination=elim, use_recall=False).agree == 1.0
    # the order in which dropped units go does not matter: A and B swapping places still agrees
    rows.configurations[(A,)] = (np.where(np.arange(n) % 2 == 0, 6.0, -0.2), np.zeros(n))
    assert stability(r, final, 1, rows, window=r.order, elimination=elim, use_recall=False).agree == 1.0
    # the kept unit's cost flips from row to row: some resamples would make C linear
    rows.configurations[(C,)] = (np.where(np.arange(n) % 2 == 0, 3.2, -0.2), np.zeros(n))
    assert 0.0 < stability(r, final, 1, rows, window=r.order, elimination=elim, use_recall=False).agree < 1.0


def test_recall_first_then_kl_among_near_ties() -> None:
    from hydracc.analysis.select import cheapest

    assert cheapest([(0.0, 5.0), (0.01, 1.0), (1.0, 0.0)]) == 1  # 0.01 is a tie for recall: the KL decides
    assert cheapest([(0.0, 5.0), (0.2, 1.0), (1.0, 0.0)]) == 0  # 0.2 is not
