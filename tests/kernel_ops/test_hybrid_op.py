"""Tests for the ``hydracc::hybrid_attention`` custom op: values, fake tensors, export, opcheck."""

from __future__ import annotations

import pytest
import torch

from hydracc.kernels import OP_SCHEMA, PARAM_NAMES, hybrid_attention, hybrid_attention_reference
from kernel_ops.kernel_cases import FIVE_KINDS, WINDOWS, make_params

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
        "float scale, Tensor[] head_params, int[] head_windows) -> Tensor"
    )


@pytest.mark.parametrize(
    ("hkv", "tq"),
    [(8, 7), (2, 7), (1, 7), (2, 1), (2, 3)],
    ids=["mha", "gqa", "mqa", "gqa-decode", "gqa-chunk"],
)
def test_op_matches_reference(hkv: int, tq: int):
    q, k, v = qkv(seed=10, hkv=hkv, tq=tq, tk=7)
    out = OP(q, k, v, KINDS, SCALE, [], [])
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
    out = OP(q.to(torch.bfloat16), k, v, KINDS, SCALE, [], [])
    assert (
        out.device.type == "meta"
        and out.shape == (2, 8, 3, 8)
        and out.dtype == torch.bfloat16
    )
    with pytest.raises(ValueError, match="head_kinds has 4 entries"):
        OP(q, k, v, KINDS[:4], SCALE, [], [])
    params = [t.to("meta") for t in make_params(8, 16)]
    out = OP(q, k, v, FIVE_KINDS, SCALE, params, WINDOWS)
    assert out.device.type == "meta" and out.shape == (2, 8, 3, 8)
    with pytest.raises(ValueError, match=r"head_params\[2\] \(hedgehog_bias\) must have shape \[8, 16\]"):
        OP(q, k, v, FIVE_KINDS, SCALE, [*params[:2], params[2][:, :4], *params[3:]], WINDOWS)
    with pytest.raises(ValueError, match="head_windows must hold"):
        OP(q, k, v, FIVE_KINDS, SCALE, params, [])


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_export_keeps_one_op_node(device: str):
    example = tuple(t.to(device) for t in qkv(seed=14))
    ep = torch.export.export(HybridLayer(), example, strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.hydracc.hybrid_attention.default) == 1
    node = next(n for n in ep.graph.nodes if n.target is OP)
    from hydracc.passes import HybridCall  # the typed view of the op's arguments

    call = HybridCall(node)
    assert (call.codes, call.scale, call.params, call.raw_windows) == (list(KINDS), SCALE, [], [])
    # the exported program, run on fresh real inputs, computes the reference
    q, k, v = qkv(seed=15)
    expected = hybrid_attention_reference(q, k, v, KINDS, SCALE) * 2.0
    torch.testing.assert_close(ep.module()(q, k, v), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_opcheck(requires_grad: bool):
    q, k, v = (t.requires_grad_(requires_grad) for t in qkv(seed=16, tq=3, tk=7))
    torch.library.opcheck(OP, (q, k, v, KINDS, SCALE, [], []))
    params = [t.requires_grad_(requires_grad) for t in make_params(8, 16, seed=16)]
    # With gradients, tracing the recomputed backward of all five kinds under dynamic shapes
    # takes ~8 s on CPU; the static trace checks the same registration in ~3 s.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")
    if not requires_grad:
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(OP, (q, k, v, FIVE_KINDS, SCALE, params, WINDOWS), test_utils=utils)


def test_op_gradient_only_where_needed():
    q, k, v = qkv(seed=17)
    k.requires_grad_()
    hybrid_attention(q, k, v, KINDS, SCALE).sum().backward()
    assert q.grad is None and v.grad is None and k.grad.shape == k.shape


# --- learned kinds: head_params, head_windows ----------------------------------------------


@pytest.mark.parametrize(
    ("hkv", "tq", "tk"),
    [(8, 7, 7), (2, 7, 7), (1, 7, 7), (2, 1, 70), (2, 70, 70)],
    ids=["mha", "gqa", "mqa", "gqa-decode", "gqa-t70"],
)
def test_op_five_kinds_matches_reference(hkv: int, tq: int, tk: int):
    q, k, v = qkv(seed=20, hkv=hkv, tq=tq, tk=tk)
    params = make_params(8, 16, seed=20)
    out = hybrid_attention(q, k, v, FIVE_KINDS, SCALE, params, WINDOWS)
    assert out.shape == (2, 8, tq, 16) and torch.isfinite(out).all()
    ref = hybrid_attention_reference(q, k, v, FIVE_KINDS, SCALE, params, WINDOWS)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_op_gradients_reach_every_head_param():
    inputs = [t.requires_grad_() for t in qkv(seed=21, tq=9, tk=9)]
    params = [t.requires_grad_() for t in make_params(8, 16, seed=21)]
    grad_out = torch.randn(2, 8, 9, 16, generator=torch.Generator().manual_seed(22))
    leaves = [*inputs, *params]
    got = torch.autograd.grad(hybrid_attention(*inputs, FIVE_KINDS, SCALE, params, WINDOWS), leaves, grad_out)
    want = torch.autograd.grad(
        hybrid_attention_reference(*inputs, FIVE_KINDS, SCALE, params, WINDOWS), leaves, grad_out
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    grads = dict(zip(PARAM_NAMES, got[3:], strict=True))
    # each tensor gets gradient exactly on the rows of the heads that use it
    users = {
        "fusion_scale": [1, 2, 3, 5, 6],
        "hedgehog_weight": [2, 5],
        "hedgehog_bias": [2, 5],
        "gdn_gate_weight": [3, 6],
        "gdn_gate_bias": [3, 6],
    }
    for name, heads in users.items():
        per_row = grads[name].reshape(8, -1).abs().amax(dim=1)
        assert (per_row[heads] > 0).all(), name
        assert (per_row[[h for h in range(8) if h not in heads]] == 0).all(), name


def test_op_gradients_match_finite_differences():
    """Central differences in float64 on a few parameter entries (the op computes in fp32)."""
    q, k, v = qkv(seed=23, b=1, tq=5, tk=5, d=4)
    params = [t.requires_grad_() for t in make_params(8, 4, seed=23)]
    weights = torch.randn(1, 8, 5, 4, generator=torch.Generator().manual_seed(24))

    def loss(ps):
        return (hybrid_attention(q, k, v, FIVE_KINDS, SCALE, ps, WINDOWS) * weights).sum()

    grads = torch.autograd.grad(loss(params), params)
    for i, index in [(0, (2,)), (1, (5, 1, 3)), (2, (2, 0)), (3, (6, 2, 0)), (3, (3, 1, 1)), (4, (3, 0)), (4, (6, 1))]:
        h = 1e-2
        plus = [t.detach().clone() for t in params]
        minus = [t.detach().clone() for t in params]
        plus[i][index] += h
        minus[i][index] -= h
        numeric = (loss(plus).double() - loss(minus).double()) / (2 * h)
        torch.testing.assert_close(grads[i][index].double(), numeric, atol=2e-3, rtol=2e-2)


class LearnedLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_params = torch.nn.ParameterList(make_params(8, 16, seed=25))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return hybrid_attention(q, k, v, FIVE_KINDS, SCALE, list(self.head_params), WINDOWS)


def test_export_with_head_params_and_windows():
    layer = LearnedLayer()
    ep = torch.export.export(layer, qkv(seed=26), strict=False)
    node = next(n for n in ep.graph.nodes if n.target is OP)
    from hydracc.passes import HybridCall  # the typed view of the op's arguments

    call = HybridCall(node)
    assert call.codes == list(FIVE_KINDS) and call.raw_windows == list(WINDOWS)
    assert [a.op for a in call.params] == ["placeholder"] * 5  # lifted parameters
    q, k, v = qkv(seed=27)
    expected = hybrid_attention_reference(q, k, v, FIVE_KINDS, SCALE, list(layer.head_params), WINDOWS)
    torch.testing.assert_close(ep.module()(q, k, v), expected, atol=1e-5, rtol=1e-5)
