"""The decode op ``hydracc::hybrid_decode`` and its fused Triton kernel (``triton_decode``).

Decode after a prefill must equal the prefill of the longer sequence, step after step, for the
plain-torch implementation (the op on CPU) and for the Triton kernel (run on CPU under the
interpreter, ``TRITON_INTERPRET=1`` from ``tests/conftest.py``). The cache tensors are built the
way ``cache.HybridLayer`` builds them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

from hydracc.kernels import (
    ELU,
    FULL,
    GDN,
    HEDGEHOG,
    STREAMING,
    hybrid_attention_reference,
    linear_state_step,
)
from hydracc.kernels.decode_op import decode_layout, hybrid_decode, hybrid_decode_reference
from kernel_ops.kernel_cases import FIVE_KINDS, WINDOWS, make_params, param_dict

SCALE = 0.3
F, E, H, G, S = FULL.code, ELU.code, HEDGEHOG.code, GDN.code, STREAMING.code
MIXED = [F, E, H, S, G, F, H, E]
MIXED_WINDOWS = [0, 0] * 3 + [2, 5] + [0, 0] * 4


class Cache:
    """The tensors a ``HybridLayer`` holds after a prefill of ``t0`` tokens of (q, k, v)."""

    def __init__(self, q, k, v, kinds, windows, params, t0: int) -> None:
        hq, hkv = q.shape[1], k.shape[1]
        self.layout = lay = decode_layout(tuple(kinds), hq, hkv)
        self.k, self.v, self.t = k, v, t0
        self.keys = k[:, list(lay.cached_kv), :t0] if lay.cached_kv else None
        self.values = v[:, list(lay.cached_kv), :t0] if lay.cached_kv else None
        self.states: list[torch.Tensor] = []
        for code, heads in lay.linear:
            kv = [h // lay.group for h in heads]
            rows = param_dict(params, list(heads)) if params else None
            _, state = linear_state_step(code, q[:, list(heads), :t0], k[:, kv, :t0], v[:, kv, :t0], None, rows)
            self.states += [s.contiguous() for s in state]
        self.sink = max((windows[2 * h] for h in lay.streaming), default=0)
        self.window = max((windows[2 * h + 1] for h in lay.streaming), default=0)
        self.wk = self.wv = self.wpos = None
        if lay.stream_kv:
            pos = torch.arange(t0)
            self.wk, self.wv, self.wpos = k[:, list(lay.stream_kv), :t0], v[:, list(lay.stream_kv), :t0], pos
            self._trim(t0 - 1)

    def _trim(self, last: int) -> None:
        keep = (self.wpos < self.sink) | (self.wpos > last - self.window)
        self.wk, self.wv, self.wpos = self.wk[:, :, keep], self.wv[:, :, keep], self.wpos[keep]

    def append(self) -> int:
        """Add token ``t`` to the KV and window caches (as ``HybridStep.attend`` does first)."""
        t, lay = self.t, self.layout
        if lay.cached_kv:
            idx = list(lay.cached_kv)
            self.keys = torch.cat([self.keys, self.k[:, idx, t : t + 1]], dim=2)
            self.values = torch.cat([self.values, self.v[:, idx, t : t + 1]], dim=2)
        if lay.stream_kv:
            idx = list(lay.stream_kv)
            self.wk = torch.cat([self.wk, self.k[:, idx, t : t + 1]], dim=2)
            self.wv = torch.cat([self.wv, self.v[:, idx, t : t + 1]], dim=2)
            self.wpos = torch.cat([self.wpos, torch.tensor([t])])
        return t

    def finish(self) -> None:
        if self.layout.stream_kv:
            self._trim(self.t)
        self.t += 1


def triton_decode(**options) -> Callable:
    triton_decode_mod = pytest.importorskip("hydracc.kernels.triton_decode")

    def run(q, k_new, v_new, keys, values, states, wk, wv, wpos, kinds, scale, params, windows):
        out = torch.full((q.shape[0], q.shape[1], 1, v_new.shape[-1]), float("nan"), dtype=q.dtype)
        got = triton_decode_mod.hybrid_decode_triton(
            q, k_new, v_new, keys, values, states, wk, wv, wpos, kinds, scale, params, windows, out=out, **options
        )
        assert got is out
        return got

    return run


def decode_steps(
    decode, kinds, windows, hq=8, hkv=2, t0=17, steps=3, d=16, dtype=torch.float32, params=True, atol=2e-5,
    triton_prefill=False,
):
    """Prefill ``t0`` tokens into a cache, decode ``steps`` more with ``decode``; compare every
    step's output with the reference over the whole sequence, and the final linear states with
    a state built from all tokens at once. ``triton_prefill``: the starting states come from the
    Triton prefill's ``states=`` output (checked against the torch ones) instead."""
    g = torch.Generator().manual_seed(t0 + steps)
    t = t0 + steps
    q = torch.randn(2, hq, t, d, generator=g).to(dtype)
    k = torch.randn(2, hkv, t, d, generator=g).to(dtype)
    v = torch.randn(2, hkv, t, d, generator=g).to(dtype)
    ps = make_params(hq, d, seed=1) if params else []
    want = hybrid_attention_reference(q, k, v, kinds, SCALE, ps, windows)
    cache = Cache(q, k, v, kinds, windows, ps, t0)
    if triton_prefill:
        prefill = pytest.importorskip("hydracc.kernels.triton_prefill")
        states = [torch.full_like(s, float("nan")) for s in cache.states]
        out = prefill.hybrid_prefill(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], kinds, SCALE, ps, windows, states=states)
        torch.testing.assert_close(out.float(), want[:, :, :t0].float(), atol=atol, rtol=atol)
        for got, expected in zip(states, cache.states, strict=True):
            torch.testing.assert_close(got, expected, atol=atol * 10, rtol=atol * 10)
        cache.states = states
    for _ in range(steps):
        p = cache.append()
        out = decode(
            q[:, :, p : p + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], cache.keys, cache.values, cache.states,
            cache.wk, cache.wv, cache.wpos, kinds, SCALE, ps, windows,
        )
        assert out.shape == (2, hq, 1, d) and out.dtype == dtype
        assert not out.isnan().any(), "unwritten output"
        torch.testing.assert_close(out.float(), want[:, :, p : p + 1].float(), atol=atol, rtol=atol)
        cache.finish()
    full = Cache(q, k, v, kinds, windows, ps, t)
    for got, expected in zip(cache.states, full.states, strict=True):
        torch.testing.assert_close(got, expected, atol=atol * 10, rtol=atol * 10)


GQA = [(8, 8), (8, 2), (8, 1)]


@pytest.mark.parametrize(("hq", "hkv"), GQA, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_decode_after_prefill_equals_longer_prefill(impl: str, hq: int, hkv: int):
    decode = hybrid_decode if impl == "torch" else triton_decode()
    decode_steps(decode, MIXED, MIXED_WINDOWS, hq=hq, hkv=hkv)


@pytest.mark.parametrize(
    ("kinds", "windows"),
    [([F] * 4, []), ([E] * 4, []), ([H, G, H, G], []), ([S, S, F, S], [0, 3, 2, 2, 0, 0, 1, 4])],
    ids=["all-full", "all-elu", "hedgehog-gdn", "streaming"],
)
def test_triton_decode_partitions(kinds: list[int], windows: list[int]):
    decode_steps(triton_decode(), kinds, windows, hq=4, hkv=2, t0=33)


def test_triton_decode_five_kinds_without_fusion_and_long_prefix():
    windows = [0, 0] * 3 + [2, 5] + [0, 0] * 2 + [0, 3, 0, 0]
    decode_steps(triton_decode(), [F, E, E, S, F, E, S, E], windows, t0=50, params=False)
    decode_steps(triton_decode(), FIVE_KINDS, WINDOWS, t0=1, steps=4)


@pytest.mark.parametrize(("hq", "hkv"), GQA, ids=["mha", "gqa", "mqa"])
def test_triton_prefill_states_then_triton_decode(hq: int, hkv: int):
    """The whole CUDA path: Triton prefill hands its final states to the Triton decode."""
    decode_steps(triton_decode(), MIXED, MIXED_WINDOWS, hq=hq, hkv=hkv, t0=33, triton_prefill=True)


def test_triton_prefill_states_segments_and_split_values():
    """States written by the last segment of each sequence, value columns split over items."""
    from hydracc.kernels.triton_prefill import PrefillConfig, hybrid_prefill

    g = torch.Generator().manual_seed(9)
    kinds = [E, H, G, E]
    q, k, v = torch.randn(1, 4, 50, 32, generator=g), torch.randn(1, 2, 50, 32, generator=g), torch.randn(1, 2, 50, 32, generator=g)
    ps = make_params(4, 32, seed=9)
    cache = Cache(q, k, v, kinds, [], ps, 50)
    states = [torch.full_like(s, float("nan")) for s in cache.states]
    out = hybrid_prefill(q, k, v, kinds, SCALE, ps, states=states, config=PrefillConfig(16, 16, 16, 16, 16, 16, num_programs=8))
    torch.testing.assert_close(out, hybrid_attention_reference(q, k, v, kinds, SCALE, ps), atol=2e-5, rtol=2e-5)
    for got, expected in zip(states, cache.states, strict=True):
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="Tq == Tk"):
        hybrid_prefill(q[:, :, 1:], k, v, kinds, SCALE, ps, states=states)
    with pytest.raises(ValueError, match="states must be fp32"):
        hybrid_prefill(q, k, v, kinds, SCALE, ps, states=states[:2])


def test_triton_decode_split_keys():
    """Full heads' keys split into ranges (flash-decoding) and merged by the combine launch."""
    decode_steps(triton_decode(nsplit=3, block_n=16), MIXED, MIXED_WINDOWS, hkv=1, t0=40)
    decode_steps(triton_decode(nsplit=64, block_n=16), [F, F, E, E], [], hq=4, hkv=4, t0=20, steps=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_decode_half_precision(dtype: torch.dtype):
    decode_steps(triton_decode(nsplit=2, block_n=16), MIXED, MIXED_WINDOWS, t0=33, dtype=dtype, atol=3e-2)


def test_triton_decode_strided_inputs():
    """q and the new keys/values as transposed views, caches as slices of bigger buffers."""
    dec = triton_decode()
    g = torch.Generator().manual_seed(3)
    kinds, windows = MIXED, MIXED_WINDOWS
    q = torch.randn(2, 1, 8, 16, generator=g).transpose(1, 2)
    k_new = torch.randn(2, 1, 2, 16, generator=g).transpose(1, 2)
    v_new = torch.randn(2, 1, 2, 16, generator=g).transpose(1, 2)
    lay = decode_layout(tuple(kinds), 8, 2)
    # (the first 9 rows of 13, as a preallocated hybrid cache hands them over)
    keys = torch.randn(2, 13, len(lay.cached_kv), 16, generator=g).transpose(1, 2)[:, :, :9]
    values = torch.randn(2, len(lay.cached_kv), 13, 32, generator=g)[:, :, :9, :16]
    wk = torch.randn(2, len(lay.stream_kv), 4, 16, generator=g)
    wv = torch.randn(2, len(lay.stream_kv), 4, 16, generator=g)
    wpos = torch.tensor([0, 1, 7, 8])
    ps = make_params(8, 16)
    states = []
    for code, heads in lay.linear:
        f = 32 if code == H else 16
        states.append(torch.rand(2, len(heads), f, 16, generator=g))
        if code != G:
            states.append(torch.rand(2, len(heads), f, generator=g) + 1)
    ref_states = [s.clone() for s in states]
    want = hybrid_decode_reference(q, k_new, v_new, keys, values, ref_states, wk, wv, wpos, kinds, SCALE, ps, windows)
    got = dec(q, k_new, v_new, keys, values, states, wk, wv, wpos, kinds, SCALE, ps, windows)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    for a, b in zip(states, ref_states, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_triton_decode_ring_window():
    """The hybrid cache's ring: window rows out of position order, unwritten rows at EMPTY_POSITION,
    the new token's row last. The kernel masks by position, as the reference does."""
    from hydracc.runtime.cache import EMPTY_POSITION

    dec = triton_decode()
    g = torch.Generator().manual_seed(5)
    kinds, windows = MIXED, MIXED_WINDOWS
    lay = decode_layout(tuple(kinds), 8, 2)
    q = torch.randn(2, 8, 1, 16, generator=g)
    k_new, v_new = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g)
    keys = torch.randn(2, len(lay.cached_kv), 11, 16, generator=g)
    values = torch.randn(2, len(lay.cached_kv), 11, 16, generator=g)
    wpos = torch.tensor([0, 1, 9, 6, EMPTY_POSITION, 7, 8, 10])
    wk = torch.randn(2, len(lay.stream_kv), len(wpos), 16, generator=g)
    wv = torch.randn(2, len(lay.stream_kv), len(wpos), 16, generator=g)
    ps = make_params(8, 16)
    states = []
    for code, heads in lay.linear:
        f = 32 if code == H else 16
        states.append(torch.rand(2, len(heads), f, 16, generator=g))
        if code != G:
            states.append(torch.rand(2, len(heads), f, generator=g) + 1)
    initial = [s.clone() for s in states]
    ref_states = [s.clone() for s in states]
    want = hybrid_decode_reference(q, k_new, v_new, keys, values, ref_states, wk, wv, wpos, kinds, SCALE, ps, windows)
    got = dec(q, k_new, v_new, keys, values, states, wk, wv, wpos, kinds, SCALE, ps, windows)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    shuffled = torch.tensor([4, 2, 0, 6, 1, 3, 5, 7])  # the same rows in another order: the same result
    again = dec(q, k_new, v_new, keys, values, [s.clone() for s in initial], wk[:, :, shuffled], wv[:, :, shuffled],
                wpos[shuffled], kinds, SCALE, ps, windows)
    torch.testing.assert_close(again, want, atol=2e-5, rtol=2e-5)


def test_decode_validation():
    g = torch.Generator().manual_seed(4)
    q, k_new, v_new = (torch.randn(1, n, 1, 16, generator=g) for n in (4, 2, 2))
    keys = torch.randn(1, 1, 5, 16, generator=g)
    states = [torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16)]
    kinds = [F, F, E, E]
    hybrid_decode(q, k_new, v_new, keys, keys, states, None, None, None, kinds, SCALE)
    with pytest.raises(ValueError, match="states must have shapes"):
        hybrid_decode(q, k_new, v_new, keys, keys, states[:1], None, None, None, kinds, SCALE)
    with pytest.raises(ValueError, match="keys/values"):
        hybrid_decode(q, k_new, v_new, None, None, states, None, None, None, kinds, SCALE)
    with pytest.raises(ValueError, match="one new token"):
        hybrid_decode(q.expand(1, 4, 2, 16), k_new, v_new, keys, keys, states, None, None, None, kinds, SCALE)


def test_decode_op_registration():
    g = torch.Generator().manual_seed(5)
    q, k_new, v_new = (torch.randn(1, n, 1, 16, generator=g) for n in (4, 2, 2))
    keys = torch.randn(1, 1, 5, 16, generator=g)
    states = [torch.rand(1, 2, 16, 16, generator=g), torch.rand(1, 2, 16, generator=g)]
    args = (q, k_new, v_new, keys, keys, states, None, None, None, [F, F, E, E], SCALE, [], [])
    torch.library.opcheck(
        torch.ops.hydracc.hybrid_decode.default, args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    assert torch._C._dispatch_has_kernel_for_dispatch_key("hydracc::hybrid_decode", "CUDA")


def test_kernels_import_and_run_without_triton():
    """Where triton is missing (macOS), ``import hydracc.kernels`` and both ops on CPU still work."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, hydracc.kernels as K\n"
        "q = torch.randn(1, 4, 3, 16); k = torch.randn(1, 2, 3, 16)\n"
        "out = K.hybrid_attention(q, k, k, [0, 0, 1, 1], 0.25)\n"
        "states = [torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16)]\n"
        "K.hybrid_decode(q[:, :, :1], k[:, :, :1], k[:, :, :1], k[:, :1], k[:, :1], states, None, None, None, [0, 0, 1, 1], 0.25)\n"
        "assert 'hydracc.kernels.triton_prefill' not in sys.modules\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
