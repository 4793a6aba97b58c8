"""The fused Triton prefill (``triton_prefill``) against the plain-torch reference.

Runs on CPU under the Triton interpreter (``TRITON_INTERPRET=1``, set in ``tests/conftest.py``):
tiny shapes, outputs poisoned with NaN first so an unwritten element fails, lengths that are
not multiples of the blocks, MHA / GQA / MQA, strided inputs, fp32 / bf16 / fp16.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from hydracc.kernels import (  # noqa: E402
    ELU,
    FULL,
    GDN,
    HEDGEHOG,
    STREAMING,
    hybrid_attention_reference,
    hybrid_op,
)
from hydracc.kernels.triton_prefill import PrefillConfig, hybrid_prefill, sdpa_head_range, work_plan  # noqa: E402
from kernel_ops.kernel_cases import FIVE_KINDS, WINDOWS, make_params, qkv  # noqa: E402

SCALE = 0.3
F, E, H, G, S = FULL.code, ELU.code, HEDGEHOG.code, GDN.code, STREAMING.code
MIXED = [F, E, H, S, E, F, H, E]  # full, elu, hedgehog (fused) and streaming, no gdn
MIXED_WINDOWS = [0, 0] * 3 + [2, 5] + [0, 0] * 4  # head 3: sink 2, window 5
PARTITIONS = {
    "all-full": ([F] * 8, []),
    "all-elu": ([E] * 8, []),
    "mixed": (MIXED, MIXED_WINDOWS),
    "five-kinds": (FIVE_KINDS, WINDOWS),
}
SMALL = PrefillConfig(16, 16, 16, 16, 16, 16, num_programs=5)  # many blocks, programs and segments


def nan_out(b: int, hq: int, tq: int, dv: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A NaN-filled ``[B, Hq, Tq, Dv]`` view of a ``[B, Tq, Hq, Dv]`` buffer."""
    return torch.full((b, tq, hq, dv), float("nan"), dtype=dtype).transpose(1, 2)


def check(q, k, v, kinds, windows=(), params=None, config=None, atol=2e-5, out_dtype=None):
    hq, d = q.shape[1], q.shape[-1]
    params = make_params(hq, d, seed=3) if params is None else params
    out = nan_out(q.shape[0], hq, q.shape[2], v.shape[-1], out_dtype or q.dtype)
    got = hybrid_prefill(q, k, v, kinds, SCALE, params, windows, out=out, config=config)
    assert got is out
    want = hybrid_attention_reference(q, k, v, kinds, SCALE, params, windows)
    assert not got.isnan().any(), "unwritten output"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("partition", list(PARTITIONS))
@pytest.mark.parametrize(("hkv", "t"), [(8, 17), (2, 33), (1, 50), (2, 1)], ids=["mha-t17", "gqa-t33", "mqa-t50", "gqa-t1"])
def test_prefill_matches_reference(partition: str, hkv: int, t: int):
    kinds, windows = PARTITIONS[partition]
    q, k, v = qkv(2, 8, hkv, t, t, d=16, seed=t)
    check(q, k, v, kinds, windows)


def test_prefill_without_params_has_no_fusion():
    q, k, v = qkv(2, 8, 2, 33, 33, seed=4)
    check(q, k, v, [F, E, E, S, E, F, E, E], MIXED_WINDOWS, params=[])


def test_prefill_small_blocks_segments_and_split_values():
    """16-wide blocks, 5 programs: unmasked and diagonal key blocks, several chunks and segments
    per linear head, and value dim 32 split into two 16-column items (fusion in the epilogue)."""
    q, k, v = qkv(2, 8, 2, 50, 50, d=32, seed=5)
    check(q, k, v, MIXED, MIXED_WINDOWS, config=SMALL)
    items, _ = work_plan(tuple(MIXED), tuple(MIXED_WINDOWS), 2, 50, 50, 32, 32, SMALL, 5)
    assert {i[3] for i in items if i[0] in (E, H)} == {0, 1}, "value dim split over two blocks"
    linear_only = [E, H] * 2  # 4 items for 5 programs: sequences are cut into segments
    q, k, v = qkv(1, 4, 2, 50, 50, d=16, seed=5)
    check(q, k, v, linear_only, config=SMALL)
    items, _ = work_plan(tuple(linear_only), (0,) * 8, 1, 50, 50, 16, 16, SMALL, 5)
    assert any(i[4] > 0 for i in items), "some linear sequence is cut into segments"


def test_prefill_with_the_gpu_block_shape():
    """Query tiles twice the key tiles, as the GPU default (128 x 64) has, with hedgehog's value dim
    split (fusion in the epilogue) and queries after earlier keys; scaled down for the interpreter."""
    m2n = PrefillConfig(32, 16, 32, 32, 16, 16, num_programs=5)
    q, k, v = qkv(2, 8, 2, 70, 101, d=32, seed=7)
    check(q, k, v, MIXED, MIXED_WINDOWS, config=m2n)
    q, k, v = qkv(1, 8, 8, 45, 45, d=32, seed=8)
    check(q, k, v, MIXED, MIXED_WINDOWS, config=m2n)


@pytest.mark.parametrize("mode", ["sdpa", "sdpa-stream"])
def test_prefill_full_heads_by_sdpa(mode: str, monkeypatch: pytest.MonkeyPatch):
    """``full_heads="sdpa"``: full heads that are whole KV groups in one range go to SDPA on
    strided slices (the kernel then never writes them), the kernel runs the rest; any other
    layout keeps the one kernel."""
    from hydracc.kernels import triton_prefill

    routed: list[tuple[int, int]] = []
    real = triton_prefill._full_heads_sdpa

    def spy(q, k, v, scale, out, heads, concurrent):
        routed.append(heads)
        out[:, heads[0] : heads[1]] = float("nan")  # anything the kernel wrote there before is lost
        return real(q, k, v, scale, out, heads, concurrent)

    monkeypatch.setattr(triton_prefill, "_full_heads_sdpa", spy)
    cfg = PrefillConfig(32, 32, 32, 16, 16, 32, num_programs=3, full_heads=mode)
    cases = [
        ([F, F, F, F, E, S, H, G], 2, 45, (0, 4)),  # GQA: heads 0-3 = KV head 0 of 2
        ([E, E, E, E, F, F, F, F], 2, 40, (4, 8)),  # GQA: KV head 1 (the slice does not start at 0)
        ([E, F, F, E, S, E, H, E], 8, 33, (1, 3)),  # MHA
    ]
    for kinds, hkv, t, heads in cases:
        windows = [w for c in kinds for w in ((2, 5) if c == S else (0, 0))]
        q, k, v = qkv(2, 8, hkv, t, t, d=16, seed=13 + t)
        assert sdpa_head_range(kinds, 8 // hkv, t, t) == heads
        routed.clear()
        check(q, k, v, kinds, windows, config=cfg)
        assert routed == [heads], "the full heads went through SDPA"
    assert sdpa_head_range(MIXED, 1, 33, 33) is None  # full heads 0 and 5: not one range
    assert sdpa_head_range([F, F, E, E], 4, 9, 9) is None  # half a KV group
    assert sdpa_head_range([E, E, F, F, F, F, F, F], 4, 9, 9) is None  # starts inside a KV group
    assert sdpa_head_range([F] * 4, 4, 9, 20) is None  # queries after a cache: SDPA's causal mask is wrong
    routed.clear()
    q, k, v = qkv(2, 8, 2, 19, 50, d=16, seed=15)
    check(q, k, v, cases[0][0], [0, 0] * 5 + [2, 5] + [0, 0] * 2, config=cfg)  # so the kernel runs them
    assert routed == []
    with pytest.raises(ValueError, match="full_heads"):
        hybrid_prefill(q, k, v, [E] * 8, SCALE, config=PrefillConfig(full_heads="cudnn"))


def test_prefill_states_with_full_heads_by_sdpa():
    """The linear heads' final states (prefill handing decode its start) do not depend on where
    the full heads run."""
    from hydracc.kernels.decode_op import decode_layout

    kinds = [F, F, F, F, E, H, G, E]
    q, k, v = qkv(1, 8, 2, 37, 37, d=16, seed=16)
    params = make_params(8, 16, seed=3)
    lay = decode_layout(tuple(kinds), 8, 2)

    def states() -> list[torch.Tensor]:
        found = []
        for code, heads in lay.linear:
            f = 32 if code == H else 16
            found.append(torch.full((1, len(heads), f, 16), float("nan")))
            if code != G:
                found.append(torch.full((1, len(heads), f), float("nan")))
        return found

    results = []
    for mode in ("triton", "sdpa"):
        st = states()
        cfg = PrefillConfig(32, 32, 32, 16, 16, 32, num_programs=3, full_heads=mode)
        out = hybrid_prefill(q, k, v, kinds, SCALE, params, out=nan_out(1, 8, 37, 16), states=st, config=cfg)
        assert not out.isnan().any() and not any(s.isnan().any() for s in st)
        results.append((out, st))
    torch.testing.assert_close(results[0][0], results[1][0], atol=2e-5, rtol=2e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_prefill_fp16_linear_state_beyond_fp16_range():
    """The running state S = sum phi(k) v^T outgrows fp16 (max 65504) here; outputs stay finite."""
    q, k, v = qkv(1, 2, 1, 1200, 1200, d=16, seed=9)
    v = v + 60.0
    q, k, v = q.half(), k.half(), v.half()
    out = hybrid_prefill(q, k, v, [E, E], SCALE, [], [], out=nan_out(1, 2, 1200, 16, torch.float16))
    want = hybrid_attention_reference(q.float(), k.float(), v.float(), [E, E], SCALE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=2e-3)


def test_prefill_strided_inputs():
    """q, k, v as transformers passes them: transposed views of [B, T, H, D] projections."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 33, 8, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 33, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 33, 2, 32, generator=g)[..., ::2].transpose(1, 2)  # non-unit last stride too
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check(q, k, v, MIXED, MIXED_WINDOWS)


def test_prefill_queries_after_earlier_keys():
    """Tq < Tk: the queries are the last Tq positions (a chunk after a cache)."""
    q, k, v = qkv(2, 8, 2, 19, 50, d=16, seed=7)
    check(q, k, v, FIVE_KINDS, WINDOWS)
    check(q, k, v, MIXED, MIXED_WINDOWS, config=SMALL)


def test_prefill_value_dim_differs():
    q, k, v = qkv(1, 8, 2, 17, 17, d=16, dv=32, seed=8)
    check(q, k, v, MIXED, MIXED_WINDOWS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_prefill_half_precision(dtype: torch.dtype):
    """bf16 computes in fp32 under the interpreter; fp16 runs the GPU's low-precision dot path."""
    q, k, v = (t.to(dtype) for t in qkv(2, 8, 2, 50, 50, d=16, seed=9))
    check(q, k, v, MIXED, MIXED_WINDOWS, atol=3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_prefill_default_output_layout():
    q, k, v = qkv(2, 8, 2, 17, 17, seed=10)
    out = hybrid_prefill(q, k, v, MIXED, SCALE, make_params(8, 16), MIXED_WINDOWS)
    assert out.shape == (2, 8, 17, 16) and out.transpose(1, 2).is_contiguous()
    assert not out.isnan().any()


def test_prefill_only_gdn_heads_skips_the_kernel():
    q, k, v = qkv(1, 4, 2, 17, 17, seed=11)
    check(q, k, v, [G] * 4)


def test_work_plan_covers_every_item_once():
    kinds, windows = tuple(FIVE_KINDS), tuple(WINDOWS)
    cfg = PrefillConfig(16, 16, 16, 16, 16, 32)
    items, offsets = work_plan(kinds, windows, 2, 40, 50, 16, 16, cfg, 7)
    assert offsets[0] == 0 and offsets[-1] == len(items) and offsets == sorted(offsets) and len(offsets) == 8
    tiles = sorted((b, h, m) for kind, b, h, m, _, _ in items if kind in (F, S))
    assert tiles == sorted((b, h, m) for b in range(2) for h, c in enumerate(kinds) if c in (F, S) for m in range(3))
    assert not any(item[0] == G for item in items), "gdn runs outside the kernel"
    # linear items: each (b, h) covers its output chunks exactly once, in segments
    # (elu: 16-token chunks, 4 of them; hedgehog: 32-token chunks, 2 of them)
    spans: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for kind, b, h, _, lo, hi in items:
        if kind in (E, H):
            spans.setdefault((b, h), []).append((lo, hi))
    assert set(spans) == {(b, h) for b in range(2) for h, c in enumerate(kinds) if c in (E, H)}
    for (_, h), segs in spans.items():
        covered = sorted(c for lo, hi in segs for c in range(lo, hi))
        assert covered == list(range(4 if kinds[h] == E else 2))


def test_cpu_op_keeps_the_composed_implementation():
    """On CPU the op never takes the Triton path; its fake keeps the contiguous layout there."""
    q, k, v = qkv(1, 8, 2, 5, 5)
    assert not hybrid_op._cuda_uses_triton(q, k, v, MIXED)
    meta = [t.to("meta") for t in (q, k, v)]
    out = torch.ops.hydracc.hybrid_attention(*meta, MIXED, SCALE, [p.to("meta") for p in make_params(8, 16)], MIXED_WINDOWS)
    assert out.is_contiguous()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("hydracc::hybrid_attention", "CUDA")


@pytest.mark.parametrize("fits", [True, False], ids=["triton", "int32-fallback"])
def test_cuda_implementation_logic(monkeypatch: pytest.MonkeyPatch, fits: bool):
    """The op's CUDA implementation, run on CPU tensors (the interpreter stands in for the GPU):
    the Triton prefill, or the composed op when offsets would pass int32, both writing the
    ``[B, Tq, Hq, Dv]`` layout the fake promises."""
    from hydracc.kernels import triton_prefill

    monkeypatch.setattr(hybrid_op, "_cuda_uses_triton", lambda q, k, v, kinds: triton_prefill.prefill_supported(q, k, v))
    monkeypatch.setattr(triton_prefill, "prefill_fits", lambda q, k, v: fits)
    q, k, v = qkv(2, 8, 2, 17, 17, seed=12)
    params = make_params(8, 16)
    got = hybrid_op._hybrid_attention_cuda(q, k, v, MIXED, SCALE, params, MIXED_WINDOWS)
    fake = hybrid_op._hybrid_attention_fake(q, k, v, MIXED, SCALE, params, MIXED_WINDOWS)
    assert got.stride() == fake.stride() and got.transpose(1, 2).is_contiguous()
    want = hybrid_attention_reference(q, k, v, MIXED, SCALE, params, MIXED_WINDOWS)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_benchmark_smoke_mode():
    """``benchmarks/kernels.py --smoke`` (tiny shapes, interpreter) runs and checks correctness."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "kernels.py"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "| prefill" in res.stdout and "| decode" in res.stdout


def test_gpu_defaults_keep_the_settings_measured_right(monkeypatch: pytest.MonkeyPatch):
    """GPU defaults (benchmarks/README.md, H200): 32-token elu chunks at every head dim (64-token
    chunks came out wrong there for bf16 at D = 16, which the interpreter cannot show) and the full
    heads by SDPA beside the kernel (faster at every benchmark shape)."""
    from hydracc.kernels import triton_prefill

    monkeypatch.setattr(triton_prefill, "interpreting", lambda: False)
    for d in (16, 32, 64, 128):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            cfg = triton_prefill.default_config(d, d, dtype)
            assert cfg.block_t <= 32 and cfg.hedgehog_block_t <= 32, (d, dtype, cfg)
            assert cfg.full_heads == "sdpa-stream"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton, not the interpreter)")
def test_prefill_on_the_gpu():
    """``benchmarks/check_kernels_gpu.py``: every kind against the fp32 reference on the GPU, at
    1024 tokens, bf16 and fp16 (what the interpreter cannot check: the tensor-core path, the GPU
    block shapes, concurrency). Skipped on machines without CUDA, CI's included."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    res = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "check_kernels_gpu.py"), "--deadline", "600"],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert res.returncode == 0, res.stdout + res.stderr
