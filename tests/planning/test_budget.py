"""Budgeted planning: KV-group units, budgets, strategies, overrides, determinism, scores in the plan, the picture."""

from __future__ import annotations

import pytest

from hydracc.analysis.scores import Analysis, HeadScores, LayerScores
from hydracc.errors import PlanError
from hydracc.frontend.capture import AttentionSite
from hydracc.planning.budget import Budget, make_budget_plan
from hydracc.planning.plan import cache_cost, load_plan


def _sites(layers: int = 4, heads: int = 8, kv: int = 2, d: int = 16) -> list[AttentionSite]:
    return [AttentionSite(i, f"model.layers.{i}.self_attn", f"sdpa_{i}", heads, kv, d, d**-0.5, True) for i in range(layers)]


def _analysis(sites: list[AttentionSite], sens: dict[tuple[int, int], float], retrieval: dict[tuple[int, int], float] | None = None) -> Analysis:
    layers = []
    for s in sites:
        group = s.num_heads // s.num_kv_heads
        units = s.num_kv_heads if s.num_kv_heads < s.num_heads else s.num_heads
        unit_kl = [sens.get((s.layer, u), 0.0) for u in range(units)]
        heads = []
        for h in range(s.num_heads):
            u = h // group if s.num_kv_heads < s.num_heads else h
            heads.append(HeadScores(retrieval=(retrieval or {}).get((s.layer, h), 0.0), sensitivity=unit_kl[u]))
        layers.append(LayerScores(s.layer, s.module, s.num_heads, s.num_kv_heads, heads, unit_kl))
    return Analysis(layers, {"source": "test", "samples": 1, "seq_len": 8}, "elu", "kv_group")


def _full_units(plan, group: int) -> set[tuple[int, int]]:
    return {(lp.layer, h // group) for lp in plan.layers for h in lp.full_heads()}


def test_heads_strategy_keeps_the_most_sensitive_kv_groups_whole() -> None:
    sites = _sites()
    analysis = _analysis(sites, {(2, 1): 0.9, (0, 0): 0.5, (3, 1): 0.1})
    plan = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), analysis=analysis)
    assert plan.unit == "kv_group"
    assert _full_units(plan, 4) == {(2, 1), (0, 0)}
    for lp in plan.layers:  # whole groups only: a group's heads are all full or all linear
        assert all(len({lp.kinds[g * 4 + i] for i in range(4)}) == 1 for g in range(2))
    assert plan.budget["full_units"] == 2 and plan.budget["kv_fraction_used"] == 0.25
    assert plan.layer(2).heads[5].scores["sensitivity"] == 0.9


def test_ranking_by_another_score() -> None:
    sites = _sites(layers=2)
    analysis = _analysis(sites, {(0, 0): 0.9}, retrieval={(1, 6): 0.8})
    plan = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), analysis=analysis, score="retrieval")
    assert _full_units(plan, 4) == {(1, 1)}


def test_kv_budget_counts_cache_bytes() -> None:
    sites = _sites()
    analysis = _analysis(sites, {(1, 0): 1.0, (2, 0): 0.5, (3, 0): 0.2})
    plan = make_budget_plan(sites, "llama", Budget(kv_budget=0.125), analysis=analysis, element_bytes=2)
    assert _full_units(plan, 4) == {(1, 0)}
    assert cache_cost(plan, sites, 2).ratio == pytest.approx(0.125)
    plan = make_budget_plan(sites, "llama", Budget(kv_budget=0.3), analysis=analysis)  # 2.4 units -> 2
    assert len(_full_units(plan, 4)) == 2


def test_mha_unit_is_the_head() -> None:
    sites = _sites(layers=2, heads=4, kv=4)
    analysis = _analysis(sites, {(1, 3): 1.0, (0, 2): 0.5})
    plan = make_budget_plan(sites, "gpt2", Budget(full_ratio=0.25), analysis=analysis)
    assert plan.unit == "head"
    assert {(lp.layer, h) for lp in plan.layers for h in lp.full_heads()} == {(1, 3), (0, 2)}


def test_layers_strategy_keeps_whole_layers_at_the_same_budget() -> None:
    sites = _sites(layers=8)
    plan = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), strategy="layers")
    full = [lp.layer for lp in plan.layers if lp.full_heads()]
    assert len(full) == 2 and all(len(plan.layer(i).full_heads()) == 8 for i in full)
    assert plan.budget["full_units"] == 4
    half = make_budget_plan(_sites(layers=4), "llama", Budget(full_ratio=0.125), strategy="layers")
    assert sum(len(lp.full_heads()) for lp in half.layers) == 4  # one group: part of one layer


def test_random_strategy_is_seeded() -> None:
    sites = _sites(layers=6)
    a = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), strategy="random", seed=1)
    b = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), strategy="random", seed=1)
    c = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), strategy="random", seed=2)
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()
    assert a.budget["full_units"] == 3


def test_heads_strategy_needs_scores() -> None:
    with pytest.raises(PlanError, match="needs head scores"):
        make_budget_plan(_sites(), "llama", Budget(full_ratio=0.25))


def test_per_layer_minimum_and_maximum() -> None:
    sites = _sites()
    analysis = _analysis(sites, {(0, 0): 0.9, (0, 1): 0.8, (1, 0): 0.1})
    capped = make_budget_plan(sites, "llama", Budget(full_ratio=0.25, max_per_layer=1), analysis=analysis)
    assert _full_units(capped, 4) == {(0, 0), (1, 0)}
    floor = make_budget_plan(sites, "llama", Budget(full_ratio=0.5, min_per_layer=1), analysis=analysis)
    assert {layer for layer, _ in _full_units(floor, 4)} == {0, 1, 2, 3}
    with pytest.raises(PlanError, match="min-full-per-layer"):
        make_budget_plan(sites, "llama", Budget(full_ratio=0.25, min_per_layer=1), analysis=analysis)
    with pytest.raises(PlanError, match="below"):
        Budget(full_ratio=0.25, min_per_layer=2, max_per_layer=1)
    with pytest.raises(PlanError, match="cannot be met in layer 2"):
        make_budget_plan(sites, "llama", Budget(full_ratio=0.5, min_per_layer=1), analysis=analysis, force_linear=["2.0", "2.4"])


def test_overrides() -> None:
    sites = _sites()
    analysis = _analysis(sites, {(0, 0): 0.9, (0, 1): 0.8})
    plan = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), analysis=analysis, keep_full=["3.7"], force_linear=["0.2"])
    assert _full_units(plan, 4) == {(3, 1), (0, 1)}  # 3.7 is in group 1 of layer 3; 0.2 takes group 0 of layer 0 out
    with pytest.raises(PlanError, match="both"):
        make_budget_plan(sites, "llama", Budget(full_ratio=0.25), analysis=analysis, keep_full=["1.0"], force_linear=["1.3"])
    with pytest.raises(PlanError, match="more than the budget"):
        make_budget_plan(sites, "llama", Budget(full_ratio=0.125), analysis=analysis, keep_full=["1.0,2.0"])
    for bad, match in (("9.0", "no layer 9"), ("1.8", "8 query heads"), ("one", "LAYER.HEAD")):
        with pytest.raises(PlanError, match=match):
            make_budget_plan(sites, "llama", Budget(full_ratio=0.25), analysis=analysis, keep_full=[bad])


@pytest.mark.parametrize(("kw", "match"), [({}, "exactly one"), ({"full_ratio": 0.5, "kv_budget": 0.5}, "exactly one"),
                                           ({"full_ratio": 1.5}, "between 0 and 1")])
def test_budget_validation(kw, match) -> None:
    with pytest.raises(PlanError, match=match):
        Budget(**kw)


def test_scores_survive_the_plan_json_round_trip_and_draw(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from hydracc.planning.plot import draw_plan

    sites = _sites()
    plan = make_budget_plan(sites, "llama", Budget(full_ratio=0.25), analysis=_analysis(sites, {(1, 1): 0.7}))
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    again = load_plan(path)
    assert again.to_json() == plan.to_json()
    assert again.layer(1).heads[4].scores["sensitivity"] == 0.7
    png = draw_plan(again, tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
