"""Capture: attention sites are found from the exported graph for every supported family."""

import pytest
import torch
from helpers import FAMILIES, build_tiny_model

from hydracc.errors import UnsupportedModelError
from hydracc.frontend.capture import SDPA, capture, require_sites
from hydracc.frontend.model import build_model, load_config


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sites_from_graph(name: str) -> None:
    family, heads, kv = FAMILIES[name]
    model = build_tiny_model(family, heads, kv)
    cap = capture(build_model(model.config.to_dict()))
    require_sites(cap)
    assert [s.layer for s in cap.sites] == [0, 1]
    for s in cap.sites:
        assert (s.num_heads, s.num_kv_heads, s.head_dim) == (heads, kv, 32 // heads)
        assert s.scale == pytest.approx((32 // heads) ** -0.5)
        assert s.causal and s.permutable
        assert s.module.endswith(str(s.layer) + (".attn" if family == "gpt2" else ".self_attn"))
    s0 = cap.sites[0]
    if family == "gpt2":  # one fused c_attn weight [in, 3*hidden]: q, k, v at offsets 0, 32, 64
        assert s0.q_proj.weight == s0.k_proj.weight == "transformer.h.0.attn.c_attn.weight"
        assert (s0.q_proj.offset, s0.k_proj.offset, s0.v_proj.offset) == (0, 32, 64)
        assert s0.q_proj.dim == 1 and s0.o_proj.dim == 0
    else:
        assert s0.q_proj.weight == "model.layers.0.self_attn.q_proj.weight" and s0.q_proj.dim == 0
        assert s0.o_proj.weight == "model.layers.0.self_attn.o_proj.weight" and s0.o_proj.dim == 1
        assert (s0.q_proj.bias is not None) == (family == "qwen2")


def test_capture_on_meta_reads_no_weights() -> None:
    model = build_tiny_model("llama", 4, 2)
    meta = build_model(model.config.to_dict())
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(b.device.type == "cpu" for b in meta.buffers())  # RoPE tables stay real
    cap = capture(meta)
    assert sum(1 for n in cap.graph_module.graph.nodes if n.target == SDPA) == 2


def test_capture_runs_with_real_weights() -> None:
    model = build_tiny_model("llama", 4, 2)
    cap = capture(build_model(model.config.to_dict()))
    ids = torch.randint(0, 64, cap.input_shape)
    with torch.no_grad():
        expected = model(ids).logits
        got = cap.run(dict(model.state_dict()), ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_sliding_window_is_rejected_with_reason() -> None:
    cfg = build_tiny_model("mistral", 4, 2).config.to_dict()
    cfg["sliding_window"] = 4  # smaller than the capture length: visible in the mask
    cap = capture(build_model(cfg))
    assert not cap.sites and len(cap.rejected) == 2
    with pytest.raises(UnsupportedModelError) as err:
        require_sites(cap)
    text = str(err.value)
    assert "NOT recognised: model.layers.0.self_attn" in text and "not plainly causal" in text


def test_unknown_model_type() -> None:
    with pytest.raises(UnsupportedModelError, match="not-a-model"):
        load_config({"model_type": "not-a-model"})
