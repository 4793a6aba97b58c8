"""HybridCall, the typed view of hydracc::hybrid_attention calls: reading, writing back, validation,
the iterator over attention sites, old positional plugins, and the per-pass counts."""

import pytest
import torch
from helpers import build_tiny_model

from hydracc.emit.hydra_section import hydra_section
from hydracc.errors import PassError
from hydracc.frontend.capture import SITE_META, capture
from hydracc.frontend.model import build_model
from hydracc.kernels.kinds import ELU, FULL, HEDGEHOG, PARAM_NAMES, STREAMING
from hydracc.passes import (
    HEAD_ORDER_META,
    HybridCall,
    PassContext,
    PassManager,
    check_graph,
    hybrid_calls,
    pipeline,
    sdpa_sites,
)
from hydracc.planning.budget import ratio_plan
from hydracc.planning.plan import HeadPlan

LAYER0 = ["elu", "full", "streaming", "hedgehog"]  # learned kind: the layer gets parameters
LAYER1 = ["full", "elu", "elu", "full"]  # no parameters, no windows


def _ctx(family: str = "llama", heads: int = 4, kv: int = 2) -> PassContext:
    cap = capture(build_model(build_tiny_model(family, heads, kv).config.to_dict()))
    plan = ratio_plan(cap.sites, family, full_ratio=0.5)
    plan.layers[0].heads = [HeadPlan(k, {"sink": 2, "window": 4} if k == "streaming" else {}) for k in LAYER0]
    plan.layers[1].heads = [HeadPlan(k) for k in LAYER1]
    return PassContext(cap, plan)


@pytest.fixture
def ctx() -> PassContext:
    c = _ctx()
    PassManager(["fold-gqa", "hybridize"]).run(c)
    return c


def test_reads_the_call(ctx: PassContext) -> None:
    calls = ctx.hybrid_calls()
    assert [c.layer for c in calls] == [0, 1]
    assert [c.node for c in hybrid_calls(ctx.graph_module.graph)] == [c.node for c in calls]
    c0, c1 = calls
    site = ctx.captured.site(0)
    assert c0.kinds == LAYER0 and c0.codes == [ELU.code, FULL.code, STREAMING.code, HEDGEHOG.code]
    assert [k.name for k in c0.head_kinds] == LAYER0
    assert c0.scale == float(site.scale)
    assert (c0.num_heads, c0.num_kv_heads, c0.group_size, c0.head_dim) == (4, 2, 2, site.head_dim)
    assert [c0.kv_head(h) for h in range(4)] == [0, 0, 1, 1] and c0.kv_groups() == [[0, 1], [2, 3]]
    assert c0.k.meta["val"].shape[1] == 2 and c0.q.meta["val"].shape[1] == 4 and c0.v is not c0.k
    assert c0.windows == [None, None, (2, 4), None] and c0.raw_windows == [0, 0, 0, 0, 2, 4, 0, 0]
    assert list(c0.param_nodes) == list(PARAM_NAMES) and c0.has_params
    assert all(n.op == "get_attr" for n in c0.params)
    assert set(c0.param_targets) == {a for n, a in ctx.added_params.items() if n.startswith(site.module + ".")}
    assert c0.full_heads() == [1] and c0.heads("elu") == [0] and c0.heads(STREAMING) == [2]
    assert c0.head_order == [0, 1, 2, 3]
    assert c1.params == [] and c1.param_nodes == {} and not c1.has_params
    assert c1.windows == [None] * 4 and c1.raw_windows == []
    assert "layer=0" in repr(c0)


def test_writes_back_and_the_graph_still_checks(ctx: PassContext) -> None:
    c0, c1 = ctx.hybrid_calls()
    before = (tuple(c0.node.args), tuple(c1.node.args))
    c0.set_windows(c0.windows)  # round trips leave the call as it was
    c0.set_params(c0.param_nodes)
    c0.set_kinds(c0.kinds)
    c1.set_kinds(c1.head_kinds)
    assert (tuple(c0.node.args), tuple(c1.node.args)) == before

    c1.set_kinds(["elu", "full", "streaming", "full"], windows=[None, None, (1, 8), None])
    assert c1.codes == [1, 0, 4, 0] and c1.raw_windows == [0, 0, 0, 0, 1, 8, 0, 0]
    c1.set_kind(0, "streaming", window=(0, 3))
    assert c1.windows == [(0, 3), None, (1, 8), None]
    c1.set_kind(0, FULL)
    c0.reorder_heads([1, 0, 3, 2])  # inside each KV group
    assert c0.kinds == ["full", "elu", "hedgehog", "streaming"] and c0.head_order == [1, 0, 3, 2]
    assert c0.node.meta[HEAD_ORDER_META] == [1, 0, 3, 2] and c0.windows == [None, None, None, (2, 4)]
    c0.set_scale(0.5)
    assert c0.scale == 0.5
    check_graph(ctx.graph_module)
    section = hydra_section(ctx, ["fold-gqa", "hybridize"], {})
    assert [entry["kinds"] for entry in section["layers"]] == [c0.kinds, c1.kinds]
    assert section["layers"][0]["head_order"] == [1, 0, 3, 2]
    assert section["layers"][0]["params"] == [f"{ctx.captured.site(0).module}.hydra.{n}" for n in PARAM_NAMES]


def test_a_pass_using_the_view_runs_through_the_manager() -> None:
    def make_first_full(c: PassContext) -> None:
        for call in c.hybrid_calls():
            if call.layer == 0:
                call.set_kinds(["full"] * call.num_heads)
                c.count("layers_made_full")

    c = _ctx()
    manager = PassManager(pipeline([make_first_full]))
    manager.run(c)
    assert manager.ran == ["fold-gqa", "hybridize", "make_first_full", "permute-heads"]
    assert manager.counts["make_first_full"] == {"layers_made_full": 1}
    assert [c.kinds for c in c.hybrid_calls()][0] == ["full"] * 4


def test_validation_errors(ctx: PassContext) -> None:
    c0, c1 = ctx.hybrid_calls()
    before = tuple(c1.node.args)
    with pytest.raises(PassError, match="layer 1: 3 kinds given for 4 query heads") as err:
        c1.set_kinds(["full"] * 3)
    assert "HybridCall" in str(err.value)
    with pytest.raises(PassError, match="head 2: unknown head kind 'softmax'"):
        c1.set_kinds(["full", "elu", "softmax", "full"])
    with pytest.raises(PassError, match="head 0: unknown head kind code 99"):
        c1.set_kinds([99, 0, 0, 0])
    with pytest.raises(PassError, match="head 1 is 'streaming' but the call has no windows"):
        c1.set_kinds(["full", "streaming", "full", "full"])
    with pytest.raises(PassError, match="sink=0, window=0"):
        c1.set_kinds(["full", "streaming", "full", "full"], windows=[None, (0, 0), None, None])
    with pytest.raises(PassError, match="learned kind 'hedgehog' but the layer has no learned parameters"):
        c1.set_kinds(["hedgehog", "full", "full", "full"])
    with pytest.raises(PassError, match="3 windows given for 4 query heads"):
        c1.set_windows([None] * 3)
    with pytest.raises(PassError, match="is 'streaming' but the call has no windows"):
        c0.set_windows(None)
    with pytest.raises(PassError, match="head_params has 2 entries"):
        c0.set_params(c0.params[:2])
    with pytest.raises(PassError, match="learned kind 'hedgehog'"):
        c0.set_params([])
    with pytest.raises(PassError, match="must name exactly"):
        c0.set_params({"fusion_scale": c0.params[0]})
    with pytest.raises(PassError, match="not a permutation"):
        c0.reorder_heads([0, 0, 1, 2])
    assert tuple(c1.node.args) == before  # a refused edit changes nothing
    placeholder = next(n for n in ctx.graph_module.graph.nodes if n.op == "placeholder")
    with pytest.raises(PassError, match="HybridCall needs a call of hydracc::hybrid_attention"):
        HybridCall(placeholder)
    graph = ctx.graph_module.graph
    count = len(graph.nodes)
    with graph.inserting_after(c1.node), pytest.raises(PassError, match="no windows"):
        HybridCall.create(graph, c1.q, c1.k, c1.v, kinds=["streaming"] * 4, scale=1.0)
    assert len(graph.nodes) == count  # the refused node was removed again


def test_iterator_and_sdpa_view() -> None:
    c = _ctx()
    sites = list(sdpa_sites(c.graph_module))
    assert [s.layer for s in sites] == [0, 1] and not any(s.enable_gqa for s in sites)
    PassManager(["fold-gqa"]).run(c)
    assert all(s.enable_gqa and s.k.meta["val"].shape[1] == 2 for s in sdpa_sites(c.graph_module.graph))
    assert list(hybrid_calls(c.graph_module)) == []
    PassManager(["hybridize"]).run(c)
    assert list(sdpa_sites(c.graph_module)) == []
    seen = []
    for call in hybrid_calls(c.graph_module):  # the list is taken first: replacing calls while iterating is safe
        seen.append(call.layer)
        graph = c.graph_module.graph
        with graph.inserting_after(call.node):
            new = HybridCall.create(graph, call.q, call.k, call.v, kinds=call.kinds, scale=call.scale,
                                    params=call.params, windows=call.raw_windows)
        new.node.meta.update(call.node.meta)
        call.node.replace_all_uses_with(new.node)
        graph.erase_node(call.node)
    assert seen == [0, 1]
    check_graph(c.graph_module)


def test_old_positional_plugin_still_works() -> None:
    """A --plugin pass written before HybridCall, editing node.args[3] directly, gives the same graph."""

    def old_style(c: PassContext) -> None:
        for node in c.graph_module.graph.nodes:
            if node.op == "call_function" and node.target == torch.ops.hydracc.hybrid_attention.default:
                args = list(node.args)
                args[3] = [FULL.code] * len(args[3])
                node.args = tuple(args)

    def new_style(c: PassContext) -> None:
        for call in c.hybrid_calls():
            call.set_kinds(["full"] * call.num_heads)

    results = []
    for fn in (old_style, new_style):
        c = _ctx()
        PassManager(pipeline([fn])).run(c)
        assert [call.kinds for call in c.hybrid_calls()] == [["full"] * 4] * 2
        results.append((c.graph_module.code, hydra_section(c, [], {})["layers"]))
    assert results[0] == results[1]


def test_manager_names_the_pass_that_left_an_invalid_call() -> None:
    def truncate_kinds(c: PassContext) -> None:
        node = next(n for n in c.graph_module.graph.nodes if n.target == torch.ops.hydracc.hybrid_attention.default)
        node.args = (*node.args[:3], [0, 0, 0], *node.args[4:])

    with pytest.raises(PassError, match=r"pass 'truncate_kinds' left an invalid call: .*layer 0: head_kinds has 3") as err:
        PassManager(pipeline([truncate_kinds])).run(_ctx())
    assert "hydracc.passes.HybridCall" in str(err.value)


def test_counts_after_the_default_pipeline(monkeypatch, capsys) -> None:
    monkeypatch.setenv("HYDRACC_DEBUG_GRAPH", "1")
    c = _ctx()
    manager = PassManager(pipeline())
    manager.run(c)
    counts = manager.counts
    assert list(counts) == ["fold-gqa", "hybridize", "permute-heads"]
    assert counts["fold-gqa"]["sites_folded"] == 2 and counts["fold-gqa"]["repeat_kv_removed"] == 4
    assert counts["fold-gqa"]["nodes_removed"] > 0
    assert counts["hybridize"] == {"sites_rewritten": 2, "non_full_heads": 5, "layers_with_params": 1,
                                   "params_added": len(PARAM_NAMES)}
    permuted = counts["permute-heads"]
    assert permuted["layers_permuted"] + permuted["layers_unpermuted"] + permuted["layers_already_ordered"] == 2
    assert permuted["layers_permuted"] == 2 and permuted["heads_moved"] == 4  # [1, 0, 2, 3] and [0, 1, 3, 2]
    assert c.pass_counts == counts
    assert [call.kinds[0] for call in c.hybrid_calls()] == ["full", "full"]
    assert all(call.node.meta[SITE_META] == call.layer for call in c.hybrid_calls())
    err = capsys.readouterr().err
    assert "--- counts after pass hybridize: sites_rewritten=2" in err and "--- graph after pass hybridize" in err


def test_counts_mha_has_nothing_to_fold() -> None:
    c = PassContext(capture(build_model(build_tiny_model("gpt2", 4, 4).config.to_dict())))
    manager = PassManager(["fold-gqa"])
    manager.run(c)
    assert list(manager.counts) == ["fold-gqa"]
    assert manager.counts["fold-gqa"]["sites_folded"] == manager.counts["fold-gqa"]["repeat_kv_removed"] == 0


def test_positional_misuse_points_at_the_view() -> None:
    def reads_an_eighth_argument(c: PassContext) -> None:
        node = next(n for n in c.graph_module.graph.nodes if n.target == torch.ops.hydracc.hybrid_attention.default)
        node.args[7]  # noqa: B018

    with pytest.raises(PassError, match="pass 'reads_an_eighth_argument' failed: IndexError") as err:
        PassManager(pipeline([reads_an_eighth_argument])).run(_ctx())
    assert "hydracc.passes.HybridCall" in str(err.value)
