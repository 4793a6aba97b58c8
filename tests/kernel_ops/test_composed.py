"""The op's portable implementation against the plain-torch reference."""

import pytest
import torch
import torch.nn.functional as F

from hydracc.kernels import ELU, FULL, GDN, HEDGEHOG, STREAMING, kind_by_code
from hydracc.kernels.composed import hybrid_attention_composed
from hydracc.kernels.naive import hybrid_attention_reference
from kernel_ops.kernel_cases import FIVE_KINDS, WINDOWS, make_params

HEADS = [(8, 8), (8, 2), (8, 1)]
# name -> (kinds of 8 query heads, whether head_params are passed)
PARTITIONS = {
    "all-full": ([FULL.code] * 8, False),
    "all-elu": ([ELU.code] * 8, False),
    "mixed": ([(i * 7 + 3) % 2 for i in range(8)], False),
    "all-hedgehog": ([HEDGEHOG.code] * 8, True),
    "all-gdn": ([GDN.code] * 8, True),
    "all-streaming": ([STREAMING.code] * 8, False),
    "five-kinds": (FIVE_KINDS, True),
    "elu-fused": ([FULL.code, ELU.code] * 4, True),
}
# sink, window per head: small windows that make streaming differ from full attention
STREAM_WINDOWS = [w for h in range(8) for w in (h % 3, 1 + h % 4)]


def _inputs(hq: int, hkv: int, tq: int, tk: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Strided views in the layout the projections produce ([B, T, H, D] transposed).
    q = torch.randn(2, tq, hq, 16, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(2, tk, hkv, 16, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(2, tk, hkv, 16, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


def _args(partition: str, hq: int = 8):
    kinds, with_params = PARTITIONS[partition]
    params = make_params(hq, 16, seed=len(partition)) if with_params else []
    windows = WINDOWS if partition == "five-kinds" else STREAM_WINDOWS if STREAMING.code in kinds else []
    return kinds, params, windows


@pytest.mark.parametrize("partition", list(PARTITIONS), ids=list(PARTITIONS))
@pytest.mark.parametrize(("hq", "hkv"), HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(
    ("tq", "tk"),
    [(1, 1), (13, 13), (5, 29), (1, 17), (65, 65), (3, 130)],
    ids=["t1", "t13", "prefix5of29", "decode17", "t65", "chunk3of130"],
)
def test_composed_matches_reference(partition: str, hq: int, hkv: int, tq: int, tk: int) -> None:
    q, k, v = _inputs(hq, hkv, tq, tk, seed=tq * 31 + tk)
    kinds, params, windows = _args(partition)
    poisoned = torch.full((2, hq, tq, 16), float("nan"))
    out = hybrid_attention_composed(q, k, v, kinds, 0.3, params, windows, out=poisoned)
    assert out is poisoned
    assert not out.isnan().any(), "some head of the output was never written"
    ref = hybrid_attention_reference(q, k, v, kinds, 0.3, params, windows)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("partition", ["mixed", "five-kinds"])
def test_composed_low_precision(dtype: torch.dtype, partition: str) -> None:
    q, k, v = _inputs(8, 2, 11, 11, dtype=dtype, seed=1)
    kinds, params, windows = _args(partition)
    out = hybrid_attention_composed(q, k, v, kinds, 0.25, params, windows)
    assert out.dtype == dtype
    ref = hybrid_attention_reference(q.float(), k.float(), v.float(), kinds, 0.25, params, windows)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_all_full_is_exactly_sdpa_with_expanded_kv() -> None:
    """All-full must equal what the original model computes, bit for bit."""
    q, k, v = _inputs(8, 2, 9, 9, seed=2)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), attn_mask=mask, scale=0.2
    )
    assert torch.equal(hybrid_attention_composed(q, k, v, [0] * 8, 0.2), expected)
    # head_params given (fusion applies to linear heads only) and head_windows change nothing
    params, windows = make_params(8, 16), [3, 5] * 8
    assert torch.equal(hybrid_attention_composed(q, k, v, [0] * 8, 0.2, params, windows), expected)


@pytest.mark.parametrize("sink", [0, 2])
def test_streaming_with_window_covering_everything_is_full(sink: int) -> None:
    q, k, v = _inputs(8, 2, 6, 20, seed=3)
    full = hybrid_attention_composed(q, k, v, [FULL.code] * 8, 0.3)
    out = hybrid_attention_composed(q, k, v, [STREAMING.code] * 8, 0.3, (), [sink, 20] * 8)
    torch.testing.assert_close(out, full, atol=1e-6, rtol=1e-6)
    small = hybrid_attention_composed(q, k, v, [STREAMING.code] * 8, 0.3, (), [sink, 3] * 8)
    assert (small - full).abs().max() > 1e-2


def test_fused_linear_heads_have_rms_fusion_scale() -> None:
    q, k, v = _inputs(8, 2, 12, 12, seed=4)
    kinds, params, windows = _args("five-kinds")
    out = hybrid_attention_composed(q, k, v, kinds, 0.3, params, windows)
    rms = out.square().mean(-1).sqrt()
    for h, code in enumerate(kinds):
        if kind_by_code(code).linear:
            torch.testing.assert_close(rms[:, h], params[0][h].expand(2, 12), atol=0, rtol=0.02)
