"""hybridize: SDPA sites become hydracc::hybrid_attention with the plan's kinds, and compute the hybrid."""

import pytest
import torch
from helpers import build_tiny_model, use_oracle

from hydracc.errors import PassError
from hydracc.frontend.capture import SDPA, SITE_META, capture
from hydracc.frontend.model import build_model
from hydracc.kernels.kinds import kind_by_name
from hydracc.passes import PassContext, PassManager, hybrid_calls
from hydracc.planning.budget import ratio_plan


@pytest.mark.parametrize(("family", "heads", "kv"), [("llama", 4, 2), ("qwen3", 4, 1), ("gpt2", 4, 4)], ids=["gqa", "mqa", "mha"])
def test_hybridize_matches_independent_oracle(family: str, heads: int, kv: int) -> None:
    model = build_tiny_model(family, heads, kv)
    cap = capture(build_model(model.config.to_dict()))
    plan = ratio_plan(cap.sites, family, full_ratio=0.5)
    PassManager(["fold-gqa", "hybridize"]).run(PassContext(cap, plan))
    calls = list(hybrid_calls(cap.graph_module))
    assert len(calls) == 2 and not any(n.target == SDPA for n in cap.graph_module.graph.nodes)
    for call in calls:
        lp = plan.layer(call.node.meta[SITE_META])
        assert call.codes == [kind_by_name(k).code for k in lp.kinds] and call.kinds == lp.kinds
        assert call.k.meta["val"].shape[1] == kv == call.num_kv_heads  # unexpanded K
    ids = torch.randint(0, 64, cap.input_shape)
    with torch.no_grad():
        got = cap.run(dict(model.state_dict()), ids)
        original = model(ids).logits
        expected = use_oracle(model, {lp.layer: lp.kinds for lp in plan.layers})(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - original).abs().max() > 1e-3  # the linear heads really changed something


def test_hybridize_requires_folded_kv() -> None:
    model = build_tiny_model("llama", 4, 2)
    cap = capture(build_model(model.config.to_dict()))
    plan = ratio_plan(cap.sites, "llama", full_ratio=0.5)
    with pytest.raises(PassError, match="run 'fold-gqa' before 'hybridize'"):
        PassManager(["hybridize"]).run(PassContext(cap, plan))


def test_hybridize_needs_a_plan() -> None:
    cap = capture(build_model(build_tiny_model("llama", 4, 2).config.to_dict()))
    with pytest.raises(PassError, match="needs a plan"):
        PassManager(["fold-gqa", "hybridize"]).run(PassContext(cap))
