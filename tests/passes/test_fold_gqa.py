"""fold-gqa: SDPA reads unexpanded K/V, the expansion disappears, outputs do not change."""

import pytest
import torch
from helpers import build_tiny_model

from hydracc.frontend.capture import SDPA, capture
from hydracc.frontend.model import build_model
from hydracc.passes import PassContext, PassManager, sdpa_sites


@pytest.mark.parametrize(("heads", "kv"), [(4, 2), (4, 1), (4, 4)], ids=["gqa", "mqa", "mha"])
def test_fold_gqa(heads: int, kv: int) -> None:
    model = build_tiny_model("llama", heads, kv)
    cap = capture(build_model(model.config.to_dict()))
    ids = torch.randint(0, 64, cap.input_shape)
    PassManager(["fold-gqa"]).run(PassContext(cap))
    graph = cap.graph_module.graph
    sites = list(sdpa_sites(graph))
    assert len(sites) == sum(n.target == SDPA for n in graph.nodes) == 2
    for site in sites:
        assert site.k.meta["val"].shape[1] == kv
        assert site.enable_gqa == (kv != heads)
    kv_expansions = [n for n in graph.nodes if n.target == torch.ops.aten.expand.default and n.meta["val"].dim() == 5]
    assert not kv_expansions  # repeat_kv's [B, Hkv, G, T, D] copies are gone
    with torch.no_grad():
        torch.testing.assert_close(cap.run(dict(model.state_dict()), ids), model(ids).logits, rtol=1e-6, atol=1e-6)
