"""permute-heads: full heads first, weights reordered consistently, outputs unchanged."""

import pytest
import torch
from helpers import build_tiny_model

from hydracc.frontend.capture import SITE_META, capture
from hydracc.frontend.model import build_model
from hydracc.passes import PassContext, PassManager, hybrid_calls
from hydracc.passes.permute_heads import HEAD_ORDER_META, full_first_order
from hydracc.planning.budget import ratio_plan
from hydracc.planning.plan import HeadPlan


def test_full_first_order_respects_kv_groups() -> None:
    # 8 query heads, 4 KV groups of 2; full heads 3 (group 1) and 6 (group 3)
    codes = [1, 1, 1, 0, 1, 1, 0, 1]
    order, kv_order = full_first_order(codes, 4)
    assert kv_order == [1, 3, 0, 2]
    assert order == [3, 2, 6, 7, 0, 1, 4, 5]
    assert all(order[j] // 2 == kv_order[j // 2] for j in range(8))  # each query head keeps its KV head


def _mixed_plan(cap, family):
    """Per-head kinds with full heads NOT first, so the permutation is never the identity."""
    plan = ratio_plan(cap.sites, family, full_ratio=0.5)
    plan.layers[0].heads = [HeadPlan(k) for k in ["elu", "full", "elu", "full"]]
    plan.layers[1].heads = [HeadPlan(k) for k in ["elu", "elu", "full", "full"]]
    return plan


@pytest.mark.parametrize(("family", "heads", "kv"), [("llama", 4, 2), ("qwen2", 4, 4), ("gpt2", 4, 4), ("qwen3", 4, 1)],
                         ids=["llama-gqa", "qwen2-bias", "gpt2-fused", "qwen3-mqa"])
def test_permutation_preserves_outputs(family: str, heads: int, kv: int) -> None:
    model = build_tiny_model(family, heads, kv)
    state = dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 16))

    plain = capture(build_model(model.config.to_dict()))
    plan = _mixed_plan(plain, family)
    PassManager(["fold-gqa", "hybridize"]).run(PassContext(plain, plan))

    permuted = capture(build_model(model.config.to_dict()))
    ctx = PassContext(permuted, plan)
    PassManager(["fold-gqa", "hybridize", "permute-heads"]).run(ctx)
    assert ctx.weight_edits, "the plan puts linear heads first, so weights must move"
    for call in hybrid_calls(permuted.graph_module):
        node, codes = call.node, call.codes
        g = heads // kv
        groups = [codes[i : i + g] for i in range(0, heads, g)]
        assert all(grp == sorted(grp) for grp in groups), f"full heads (code 0) first in each KV group: {codes}"
        has_full = [0 in grp for grp in groups]
        assert has_full == sorted(has_full, reverse=True), f"KV groups with a full head first: {codes}"
        lp = plan.layer(node.meta[SITE_META])
        assert [lp.kinds[i] for i in node.meta[HEAD_ORDER_META]] == ["full" if c == 0 else "elu" for c in codes]
    edited = {name: ctx.weight_edits.apply(name, t) for name, t in state.items()}
    assert any(not torch.equal(edited[n], state[n]) for n in ctx.weight_edits.names())
    with torch.no_grad():
        expected = plain.run(state, ids)
        got = permuted.run(edited, ids)
        wrong = permuted.run(state, ids)  # permuted kinds with unpermuted weights
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (wrong - expected).abs().max() > 1e-4


def test_head_order_dependent_block_is_left_alone() -> None:
    """OLMo2 normalizes q and k over all head channels with a per-channel weight the pass does
    not move; the numeric block check must catch that and skip the layer."""
    from transformers import AutoModelForCausalLM, Olmo2Config

    torch.manual_seed(0)
    cfg = Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong reorder would show
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    plain = capture(build_model(model.config.to_dict()))
    plan = _mixed_plan(plain, "olmo2")
    PassManager(["fold-gqa", "hybridize"]).run(PassContext(plain, plan))
    permuted = capture(build_model(model.config.to_dict()))
    ctx = PassContext(permuted, plan)
    PassManager(["fold-gqa", "hybridize", "permute-heads"]).run(ctx)
    assert not ctx.weight_edits
    assert sum("skipped (reordering heads changes" in note for note in ctx.notes) == 2
    ids = torch.randint(0, 64, (2, 16))
    state = dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(permuted.run(state, ids), plain.run(state, ids), rtol=0, atol=0)
