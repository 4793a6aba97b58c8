"""The op's portable implementation against the plain-torch reference."""

import pytest
import torch
import torch.nn.functional as F

from hydracc.kernels.composed import hybrid_attention_composed
from hydracc.kernels.reference import hybrid_attention_reference

HEADS = [(8, 8), (8, 2), (8, 1)]
PARTITIONS = {
    "all-full": lambda h: [0] * h,
    "all-linear": lambda h: [1] * h,
    "mixed": lambda h: [(i * 7 + 3) % 2 for i in range(h)],
}


def _inputs(hq: int, hkv: int, tq: int, tk: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Strided views in the layout the projections produce ([B, T, H, D] transposed).
    q = torch.randn(2, tq, hq, 16, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(2, tk, hkv, 16, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(2, tk, hkv, 16, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("partition", list(PARTITIONS), ids=list(PARTITIONS))
@pytest.mark.parametrize(("hq", "hkv"), HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(("tq", "tk"), [(1, 1), (13, 13), (5, 29), (1, 17)], ids=["t1", "t13", "prefix5of29", "decode17"])
def test_composed_matches_reference(partition: str, hq: int, hkv: int, tq: int, tk: int) -> None:
    q, k, v = _inputs(hq, hkv, tq, tk)
    kinds = PARTITIONS[partition](hq)
    poisoned = torch.full((2, hq, tq, 16), float("nan"))
    out = hybrid_attention_composed(q, k, v, kinds, 0.3, out=poisoned)
    assert not out.isnan().any(), "some head of the output was never written"
    torch.testing.assert_close(out, hybrid_attention_reference(q, k, v, kinds, 0.3), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_composed_low_precision(dtype: torch.dtype) -> None:
    q, k, v = _inputs(8, 2, 11, 11, dtype=dtype, seed=1)
    kinds = PARTITIONS["mixed"](8)
    out = hybrid_attention_composed(q, k, v, kinds, 0.25)
    assert out.dtype == dtype
    ref = hybrid_attention_reference(q.float(), k.float(), v.float(), kinds, 0.25)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_all_full_is_exactly_sdpa_with_expanded_kv() -> None:
    """All-full must equal what the original model computes, bit for bit."""
    q, k, v = _inputs(8, 2, 9, 9, seed=2)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), attn_mask=mask, scale=0.2
    )
    assert torch.equal(hybrid_attention_composed(q, k, v, [0] * 8, 0.2), expected)
