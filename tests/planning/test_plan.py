"""Plan format, validation with named fields, the ratio planner and KV-cache accounting."""

import json

import pytest

from hydracc.errors import PlanError
from hydracc.frontend.capture import AttentionSite
from hydracc.planning.budget import ratio_plan
from hydracc.planning.plan import cache_cost, check_plan_fits, load_plan, plan_from_json


def _sites(layers: int = 3, heads: int = 8, kv: int = 2, d: int = 16) -> list[AttentionSite]:
    return [AttentionSite(i, f"model.layers.{i}.self_attn", f"sdpa_{i}", heads, kv, d, d**-0.5, True) for i in range(layers)]


def test_ratio_plan_uses_kv_groups_under_gqa() -> None:
    plan = ratio_plan(_sites(heads=8, kv=4), "llama", full_ratio=0.25)
    assert plan.unit == "kv_group"
    for lp in plan.layers:
        assert lp.kinds == ["full", "full"] + ["elu"] * 6  # one whole group of 2 query heads
        assert lp.cached_kv_heads() == [0]


def test_ratio_plan_spreads_over_layers_under_mqa() -> None:
    plan = ratio_plan(_sites(layers=4, heads=8, kv=1), "qwen3", full_ratio=0.25)
    assert [len(lp.full_heads()) for lp in plan.layers] == [0, 0, 0, 8]
    plan = ratio_plan(_sites(layers=4, heads=8, kv=2), "llama", full_ratio=0.25)
    assert [len(lp.cached_kv_heads()) for lp in plan.layers] == [0, 1, 0, 1]
    assert plan.budget["full_units"] == 2


def test_ratio_plan_heads_under_mha_and_extremes() -> None:
    plan = ratio_plan(_sites(heads=8, kv=8), "gpt2", full_ratio=0.5)
    assert plan.unit == "head"
    assert plan.layers[0].full_heads() == [0, 2, 4, 6]
    assert all(k == "elu" for k in ratio_plan(_sites(), "llama", full_ratio=0.0).layers[0].kinds)
    assert all(k == "full" for k in ratio_plan(_sites(), "llama", full_ratio=1.0).layers[0].kinds)
    with pytest.raises(PlanError):
        ratio_plan(_sites(), "llama", full_ratio=1.5)


def test_json_round_trip(tmp_path) -> None:
    plan = ratio_plan(_sites(), "llama", full_ratio=0.5)
    path = tmp_path / "plan.json"
    path.write_text(plan.dumps())
    again = load_plan(path)
    assert again.to_json() == plan.to_json()
    assert json.loads(path.read_text())["version"] == 1


def _doc() -> dict:
    return ratio_plan(_sites(), "llama", full_ratio=0.5).to_json()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.update(format="other"), "plan.format"),
        (lambda d: d.update(version=99), "plan.version"),
        (lambda d: d["layers"][1]["heads"].append({"kind": "elu"}), "plan.layers[1].heads"),
        (lambda d: d["layers"][2]["heads"][5].update(kind="softmax"), "plan.layers[2].heads[5].kind"),
        (lambda d: d["layers"][0].update(num_kv_heads=3), "plan.layers[0].num_kv_heads"),
        (lambda d: d["layers"][1].update(layer=0), "plan.layers[1].layer"),
        (lambda d: d["layers"][0]["heads"][0].update(params=[1]), "plan.layers[0].heads[0].params"),
        (lambda d: d["layers"][0]["heads"][7].update(params={"x": 1}), "plan.layers[0].heads[7].params"),
        (lambda d: d.update(version=True), "plan.version"),
        (lambda d: d["layers"][1].update(num_heads="8"), "plan.layers[1].num_heads"),
        (lambda d: d["layers"][0]["heads"].__setitem__(2, {"kind": "streaming", "params": {"window": 0}}), "plan.layers[0].heads[2].params.window"),
        (lambda d: d["layers"][0]["heads"].__setitem__(2, {"kind": "streaming", "params": {"sink": -1}}), "plan.layers[0].heads[2].params.sink"),
        (lambda d: d["layers"][0]["heads"].__setitem__(2, {"kind": "gdn", "params": {"window": 4}}), "plan.layers[0].heads[2].params"),
        (lambda d: d.update(fusion="yes"), "plan.fusion"),
    ],
    ids=["format", "version", "extra-head", "unknown-kind", "kv-heads", "duplicate-layer", "params", "unknown-param",
         "bool-version", "string-heads", "zero-window", "negative-sink", "gdn-window", "fusion"],
)
def test_validation_names_the_field(edit, field: str) -> None:
    doc = _doc()
    edit(doc)
    with pytest.raises(PlanError, match=field.replace("[", r"\[").replace("]", r"\]")):
        plan_from_json(doc)


def test_plan_must_fit_the_model() -> None:
    plan = ratio_plan(_sites(layers=3), "llama", full_ratio=0.5)
    with pytest.raises(PlanError, match=r"plan.layers\[2\].layer: layer 2 does not exist"):
        check_plan_fits(plan, _sites(layers=2))
    with pytest.raises(PlanError, match="no entry for layer"):
        check_plan_fits(plan, _sites(layers=4))
    with pytest.raises(PlanError, match="has 4 query heads"):
        check_plan_fits(plan, _sites(layers=3, heads=4, kv=2))
    check_plan_fits(plan, _sites(layers=3))


def test_a_streaming_window_must_fit_the_models_positions() -> None:
    doc = ratio_plan(_sites(layers=1), "llama", full_ratio=0.5).to_json()
    doc["layers"][0]["heads"][-1] = {"kind": "streaming", "params": {"sink": 4, "window": 2**30}}
    plan = plan_from_json(doc)
    check_plan_fits(plan, _sites(layers=1))  # no position limit known: accepted
    check_plan_fits(plan, _sites(layers=1), max_positions=2**30 + 4)
    with pytest.raises(PlanError, match=r"heads\[7\].params: sink \+ window is 1073741828, more than the model's 2048 positions"):
        check_plan_fits(plan, _sites(layers=1), max_positions=2048)


def test_unreadable_plan_file(tmp_path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(bad)
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "missing.json")


def test_cache_cost_by_hand() -> None:
    sites = _sites(layers=2, heads=8, kv=2, d=16)
    plan = ratio_plan(sites, "llama", full_ratio=0.5)  # one of two KV groups kept per layer
    cost = cache_cost(plan, sites, element_bytes=2)
    assert cost.kv_bytes_per_token_before == 2 * 2 * (2 * 2 * 16)  # layers * (k+v) * kv heads * d * bytes
    assert cost.kv_bytes_per_token_after == 2 * (2 * 1 * 16 * 2)
    assert cost.ratio == 0.5
    assert cost.linear_state_bytes == 2 * 4 * (16 * 16 + 16) * 4


def test_new_kinds_in_plans_and_their_cost() -> None:
    sites = _sites(layers=1, heads=4, kv=2, d=16)
    doc = ratio_plan(sites, "llama", full_ratio=0.5).to_json()
    doc["layers"][0]["heads"] = ["full", "streaming", "gdn", {"kind": "streaming", "params": {"window": 10, "sink": 2}}]
    plan = plan_from_json(doc)
    lp = plan.layers[0]
    assert lp.heads[1].params == {"sink": 4, "window": 64}  # defaults filled in on load
    assert lp.head_windows() == [0, 0, 4, 64, 0, 0, 2, 10]
    assert lp.full_heads() == [0] and lp.cached_kv_heads() == [0]
    assert plan.layer_has_params(lp)  # gdn is learned: parameters (and fusion) come with it
    cost = cache_cost(plan, sites, element_bytes=2)
    assert cost.kv_bytes_per_token_after == 2 * 16 * 2  # only KV head 0 (the full head's) grows
    # gdn state d*d fp32, plus streaming windows for both KV groups (heads 1 and 3): the layer's
    # largest sink + largest window rows of k and v each (what the hybrid cache keeps)
    assert cost.linear_state_bytes == 16 * 16 * 4 + 2 * (4 + 64) * 2 * 16 * 2
    doc["layers"][0]["heads"] = ["full", "full", "elu", "elu"]
    assert not plan_from_json(doc).layer_has_params(plan_from_json(doc).layers[0])
    doc["fusion"] = True
    fused = plan_from_json(doc)
    assert fused.layer_has_params(fused.layers[0]) and fused.to_json()["fusion"] is True
