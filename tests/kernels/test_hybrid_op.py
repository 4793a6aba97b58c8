"""Tests for the ``hydracc::hybrid_attention`` custom op: values, fake tensors, export, opcheck."""

from __future__ import annotations

import pytest
import torch

from hydracc.kernels import OP_SCHEMA, hybrid_attention, hybrid_attention_reference

OP = torch.ops.hydracc.hybrid_attention.default
KINDS = [0, 1, 1, 1, 1, 0, 1, 1]  # 8 query heads, 2 of them full
SCALE = 0.25


def qkv(
    seed: int,
    b: int = 2,
    hq: int = 8,
    hkv: int = 2,
    tq: int = 7,
    tk: int = 7,
    d: int = 16,
):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, tq, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
    )


class HybridLayer(torch.nn.Module):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        return hybrid_attention(q, k, v, KINDS, SCALE) * 2.0


def test_schema_as_registered():
    assert str(OP._schema) == "hydracc::" + OP_SCHEMA.replace(
        "(", "hybrid_attention(", 1
    )
    assert str(OP._schema) == (
        "hydracc::hybrid_attention(Tensor q, Tensor k, Tensor v, int[] head_kinds, "
        "float scale, Tensor[] head_params) -> Tensor"
    )


@pytest.mark.parametrize(
    ("hkv", "tq"),
    [(8, 7), (2, 7), (1, 7), (2, 1), (2, 3)],
    ids=["mha", "gqa", "mqa", "gqa-decode", "gqa-chunk"],
)
def test_op_matches_reference(hkv: int, tq: int):
    q, k, v = qkv(seed=10, hkv=hkv, tq=tq, tk=7)
    out = OP(q, k, v, KINDS, SCALE, [])
    assert out.shape == (2, 8, tq, 16) and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    for t in (q, k, v):  # a fresh output, never an input's storage
        assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    torch.testing.assert_close(
        out, hybrid_attention_reference(q, k, v, KINDS, SCALE), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        hybrid_attention(q, k, v, KINDS, SCALE), out, atol=0, rtol=0
    )


def test_op_gradients_match_reference():
    inputs = [t.requires_grad_() for t in qkv(seed=11)]
    grad_out = torch.randn(2, 8, 7, 16, generator=torch.Generator().manual_seed(12))
    got = torch.autograd.grad(hybrid_attention(*inputs, KINDS, SCALE), inputs, grad_out)
    want = torch.autograd.grad(
        hybrid_attention_reference(*inputs, KINDS, SCALE), inputs, grad_out
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_op_on_meta_tensors():
    q, k, v = (t.to("meta") for t in qkv(seed=13, tq=3, tk=9))
    v = v[..., :8]  # value head dim may differ from the query head dim
    out = OP(q.to(torch.bfloat16), k, v, KINDS, SCALE, [])
    assert (
        out.device.type == "meta"
        and out.shape == (2, 8, 3, 8)
        and out.dtype == torch.bfloat16
    )
    with pytest.raises(ValueError, match="head_kinds has 4 entries"):
        OP(q, k, v, KINDS[:4], SCALE, [])


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_export_keeps_one_op_node(device: str):
    example = tuple(t.to(device) for t in qkv(seed=14))
    ep = torch.export.export(HybridLayer(), example, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.hydracc.hybrid_attention.default) == 1
    node = next(n for n in ep.graph.nodes if n.target is OP)
    assert node.args[3:] == (KINDS, SCALE, [])
    # the exported program, run on fresh real inputs, computes the reference
    q, k, v = qkv(seed=15)
    expected = hybrid_attention_reference(q, k, v, KINDS, SCALE) * 2.0
    torch.testing.assert_close(ep.module()(q, k, v), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck(requires_grad: bool):
    q, k, v = (t.requires_grad_(requires_grad) for t in qkv(seed=16, tq=3, tk=7))
    torch.library.opcheck(OP, (q, k, v, KINDS, SCALE, []))


def test_op_gradient_only_where_needed():
    q, k, v = qkv(seed=17)
    k.requires_grad_()
    hybrid_attention(q, k, v, KINDS, SCALE).sum().backward()
    assert q.grad is None and v.grad is None and k.grad.shape == k.shape
