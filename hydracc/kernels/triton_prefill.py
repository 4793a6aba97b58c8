"""Fused Triton prefill for ``hydracc::hybrid_attention``: a whole hybrid layer in one launch.

The reference beside it is ``naive.hybrid_attention_reference``; measurements and the notes
behind the defaults are in ``benchmarks/README.md`` ("Kernel notes moved from docstrings").

Design decisions:
- One persistent launch runs the softmax heads and the elu/hedgehog heads together, so both
  kinds of work fill the GPU at once. The host builds a work list of softmax tiles
  ``(b, h, q-block)`` (full and streaming heads) and linear items ``(b, h, v-block, chunk
  segment)``, each with a cost estimate; a linear sequence is cut into segments only when it
  would outlast the average program load (a segment first runs the state over the earlier
  chunks, cheaply, then writes its own). Items are dealt out longest-first to the least loaded
  of ``programs_per_sm x SMs`` programs; program ``p`` runs ``items[offsets[p]:offsets[p+1]]``.
  The list is cached per (kinds, windows, shape, blocks, programs, device).
- Softmax tiles are flash-attention style: online softmax in fp32 (exp2), key blocks below the
  diagonal unmasked, the diagonal block(s) masked; streaming heads visit only their sink blocks
  and the blocks of their window, masked by ``j < sink or j > p - window``.
- Linear items run chunk by chunk: feature map (elu + 1, or hedgehog's projection and two
  softmaxes), intra-chunk masked ``phi(q) phi(k)^T``, the inter-chunk state ``S``/``z``
  accumulated in fp32 registers, the denominator and the scale-normalized fusion. For bf16
  inputs the dots take bf16 operands (the state is rounded to bf16 as an operand, about 2^-9
  relative); for fp16 inputs the linear heads' dots stay fp32, since the state and the chunk
  weights outgrow fp16's range on long sequences. Fusion needs the whole value row:
  when a kind's value dim fits one v-block it is applied in the kernel; when it is split over
  several v-blocks (hedgehog with Dv > 64 on a GPU, to bound registers) the kernel stores each
  block's per-token sum of squares and a small epilogue launch rescales those rows.
- Full heads may leave the kernel (``PrefillConfig.full_heads``, on by default on GPUs): when
  they are one range of whole KV groups and Tq == Tk, SDPA (torch's flash kernel) runs them
  on strided slices of q/k/v, on a side stream concurrent with the kernel, and writes its
  heads of the output; the kernel's work list then holds only the other heads (the measured
  gain is in ``benchmarks/README.md``).
- ``gdn`` heads are NOT fused: they run through the plain-torch chunked reference
  (``kinds.gdn.gated_delta_rule``) plus fusion in this wrapper, into the same output buffer.
- Optionally (``states=``) the linear heads' final states are written in the decode op's
  layout, so a prefill from an empty cache hands ``hybrid_decode`` its starting state.
- Arguments travel grouped as Triton tuples (pointers with their strides); kind codes are
  ``tl.constexpr`` values taken from the kind table.
- q and the unexpanded k, v are read through their strides (GQA: query head h reads KV head
  ``h // group``); no copies. The output is written to a ``[B, Tq, Hq, Dv]`` buffer and its
  ``transpose(1, 2)`` view is returned, so a caller's ``.transpose(1, 2).contiguous()`` is free.
- Offsets are int32: inputs with 2**31 or more elements are refused (the op then falls back to
  the composed implementation, as it does for layers without an elu or hedgehog head).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from hydracc.kernels.kinds import ELU, FULL, HEAD_KINDS, HEDGEHOG, STREAMING, kind_by_code, state_shapes
from hydracc.kernels.layout import DecodeLayout, decode_layout, validate_hybrid_inputs
from hydracc.kernels.naive import fuse_linear_output, select_param_rows
from hydracc.kernels.triton_common import (
    EPS,
    LOG2E,
    dot_block,
    dot_mode,
    elu_phi,
    fits_int32,
    interpreting,
    mm,
    num_sms,
    on_device,
    softmax_rows,
    supported_head_dims,
)

_SOFTMAX_KINDS = (FULL.code, STREAMING.code)
_TRITON_LINEAR = (ELU.code, HEDGEHOG.code)
TORCH_KINDS = tuple(kind.code for kind in HEAD_KINDS if kind.linear and kind.code not in _TRITON_LINEAR)
"""Linear kinds the kernel does not fuse (gdn): their kind's torch hooks run them in the wrapper."""
PREFILL_KINDS = _SOFTMAX_KINDS + _TRITON_LINEAR + TORCH_KINDS
"""Every kind ``hybrid_prefill`` runs; a softmax-like kind added to the table needs a kernel branch."""
ITEM = tl.constexpr(6)  # int32 fields per work item: kind, b, h, block, c_lo, c_hi
K_FULL = tl.constexpr(FULL.code)
K_ELU = tl.constexpr(ELU.code)
K_HEDGEHOG = tl.constexpr(HEDGEHOG.code)
K_STREAMING = tl.constexpr(STREAMING.code)


@dataclass(frozen=True)
class PrefillConfig:
    """Block sizes and launch shape of the prefill kernel (all block sizes >= 16, powers of 2).

    ``block_m``/``block_n``: query/key tile of softmax heads; ``block_t``/``hedgehog_block_t``:
    chunk length of elu/hedgehog heads; ``elu_block_dv``/``hedgehog_block_dv``: value columns per
    linear work item (a value dim wider than that is split over several items, and fusion then
    runs in a small epilogue launch); ``programs_per_sm``: persistent programs
    per SM (``num_programs`` overrides the total); ``linear_cost``: weight of a linear chunk's
    multiply-adds against a softmax block's in the work plan (a guess: chunks run serially).
    ``full_heads``: ``"triton"`` runs full heads as softmax tiles of the one kernel; ``"sdpa"``
    hands them to ``scaled_dot_product_attention`` (torch's flash kernel) as one strided slice
    when they are a contiguous range of whole KV groups and Tq == Tk, the kernel running the
    rest, one launch after the other; ``"sdpa-stream"`` the same with SDPA on a side stream,
    concurrent with the kernel. Other layers keep the one kernel.
    """

    block_m: int = 64
    block_n: int = 64
    block_t: int = 64
    elu_block_dv: int = 128
    hedgehog_block_dv: int = 64
    hedgehog_block_t: int = 32
    num_warps: int = 8
    num_stages: int = 2
    programs_per_sm: int = 2
    num_programs: int | None = None
    linear_cost: float = 2.0
    full_heads: str = "triton"


FULL_HEADS_MODES = ("triton", "sdpa", "sdpa-stream")


def default_config(d: int, dv: int, dtype: torch.dtype = torch.bfloat16) -> PrefillConfig:
    """Blocks for head dims ``d``, ``dv`` and the input dtype (the same for every mix of kinds).

    Decisions (the measurements behind them: ``benchmarks/README.md``):
    - ``full_heads="sdpa-stream"`` on GPUs: SDPA runs the full heads beside the kernel (layers
      whose full heads are not whole KV groups in one range, or chunks after a cache, keep the
      one kernel);
    - 32-token elu chunks at every head dim (64-token chunks miscomputed on a GPU at D = 16);
    - tiles sized so the persistent kernel spills little on sm_90;
    - under the interpreter: few large blocks, everything in the one kernel.
    """
    bdv = dot_block(dv)
    if interpreting():
        return PrefillConfig(32, 32, 32, bdv, bdv, 32, num_warps=4, num_stages=1, num_programs=3)
    if dtype == torch.float32:
        return PrefillConfig(32, 32, 16, min(bdv, 64), min(bdv, 32), 16, num_warps=8, num_stages=1,
                             full_heads="sdpa-stream")
    if dot_block(d) <= 64:
        return PrefillConfig(128, 64, 32, min(bdv, 128), min(bdv, 64), 32, num_warps=8, full_heads="sdpa-stream")
    return PrefillConfig(128, 64, 32, min(bdv, 128), min(bdv, 64), 16, num_warps=8, full_heads="sdpa-stream")


# --- device code ------------------------------------------------------------------------


@triton.jit
def _attn_blocks(
    acc, m_i, l_i, q, pos, k_base, v_base, n_lo, n_hi, sink, window, Tk, D, Dv,
    skt, skd, svt, svd, qk_scale,
    MASK: tl.constexpr, STREAM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, LOWP: tl.constexpr,
):
    """Online-softmax update of one query tile over key blocks ``[n_lo, n_hi)``."""
    DT = k_base.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for n in range(n_lo, n_hi):
        j = n * BLOCK_N + offs_n
        jm = j < Tk
        k = tl.load(k_base + j[:, None] * skt + offs_d[None, :] * skd,
                    mask=jm[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(v_base + j[:, None] * svt + offs_dv[None, :] * svd,
                    mask=jm[:, None] & (offs_dv < Dv)[None, :], other=0.0)
        if not LOWP:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = mm(q, tl.trans(k), LOWP, DT) * qk_scale
        if MASK:
            ok = (j[None, :] <= pos[:, None]) & jm[None, :]
            if STREAM:
                ok = ok & ((j[None, :] < sink) | (j[None, :] > pos[:, None] - window))
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mm(p, v, LOWP, DT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _softmax_tile(
    io, io_st, b, h, mblk, sink, window, stream, GROUP, Tq, Tk, D, Dv, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LOWP: tl.constexpr,
):
    """One ``BLOCK_M``-query tile of a full (``stream`` false) or streaming head.

    ``io``: (q, k, v, out), ``io_st`` their ``[B, H, T, D]`` strides."""
    q_ptr, k_ptr, v_ptr, o_ptr = io
    sq, sk, sv, so = io_st
    sqb, sqh, sqt, sqd = sq
    skb, skh, skt, skd = sk
    svb, svh, svt, svd = sv
    sob, soh, sot, sod = so
    hk = h // GROUP
    shift = Tk - Tq
    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m < Tq
    pos = offs_m + shift
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=rows[:, None] & (offs_d < D)[None, :], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_first = mblk * BLOCK_M + shift
    p_last = tl.minimum(mblk * BLOCK_M + BLOCK_M, Tq) - 1 + shift
    n_end = p_last // BLOCK_N + 1
    if stream:
        n_sink = tl.minimum((sink + BLOCK_N - 1) // BLOCK_N, n_end)
        acc, m_i, l_i = _attn_blocks(
            acc, m_i, l_i, q, pos, k_base, v_base, 0, n_sink, sink, window, Tk, D, Dv,
            skt, skd, svt, svd, qk_scale, True, True, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
        n_lo = tl.maximum(tl.maximum(p_first - window + 1, 0) // BLOCK_N, n_sink)
        acc, m_i, l_i = _attn_blocks(
            acc, m_i, l_i, q, pos, k_base, v_base, n_lo, n_end, sink, window, Tk, D, Dv,
            skt, skd, svt, svd, qk_scale, True, True, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
    else:
        n_free = (p_first + 1) // BLOCK_N  # blocks whose keys every row of the tile sees
        acc, m_i, l_i = _attn_blocks(
            acc, m_i, l_i, q, pos, k_base, v_base, 0, n_free, sink, window, Tk, D, Dv,
            skt, skd, svt, svd, qk_scale, False, False, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
        acc, m_i, l_i = _attn_blocks(
            acc, m_i, l_i, q, pos, k_base, v_base, n_free, n_end, sink, window, Tk, D, Dv,
            skt, skd, svt, svd, qk_scale, True, False, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_dv[None, :] * sod,
             o.to(o_ptr.dtype.element_ty), mask=rows[:, None] & (offs_dv < Dv)[None, :])


@triton.jit
def _linear_seq(
    io, io_st, params, params_st, ss_ptr, ss_st, state, state_st, slot, b, h, vb, c_lo, c_hi, GROUP,
    Tq, Tk, D, Dv,
    KIND: tl.constexpr, FUSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BDV: tl.constexpr, LOWP: tl.constexpr, STORE_STATE: tl.constexpr,
):
    """Normalized causal linear attention of head ``h``, value columns of block ``vb``.

    Runs the state over chunks ``[0, c_hi)`` and writes the outputs of chunks ``[c_lo, c_hi)``
    (one segment of the sequence; earlier chunks only build the state).
    ``FUSE``: 0 no fusion, 1 fusion here (the block holds all of Dv), 2 store the block's
    per-token sum of squares for the epilogue. ``STORE_STATE``: the segment that ends the
    sequence writes the final state (its value columns of ``S``; ``z`` from v-block 0) to row
    ``slot`` of ``state`` = (S, z) (hedgehog: feature rows ``[0, D)`` then ``[D, 2D)``).
    ``io``: (q, k, v, out); ``params``: (fusion_scale, hedgehog_weight, hedgehog_bias);
    ``ss_ptr``: per-token sums of squares for the epilogue; each with strides in ``*_st``.
    """
    q_ptr, k_ptr, v_ptr, o_ptr = io
    sq, sk, sv, so = io_st
    sqb, sqh, sqt, sqd = sq
    skb, skh, skt, skd = sk
    svb, svh, svt, svd = sv
    sob, soh, sot, sod = so
    fs_ptr, hw_ptr, hb_ptr = params
    sfs_t, shw, shb = params_st
    sfs = sfs_t[0]
    shw_h, shw_i, shw_j = shw
    shb_h, shb_d = shb
    ssb, ssh, ssv = ss_st
    st_ptr, zt_ptr = state
    sst, szt = state_st
    sstb, ssth, sstf, sstd = sst
    sztb, szth, sztf = szt
    DT = k_ptr.dtype.element_ty
    hk = h // GROUP
    shift = Tk - Tq
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = vb * BDV + tl.arange(0, BDV)
    dm = offs_d < D
    vm = offs_v < Dv
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    causal = offs_t[:, None] >= offs_t[None, :]
    s1 = tl.zeros([BLOCK_D, BDV], dtype=tl.float32)
    z1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    if KIND == K_HEDGEHOG:
        s2 = tl.zeros([BLOCK_D, BDV], dtype=tl.float32)
        z2 = tl.zeros([BLOCK_D], dtype=tl.float32)
        w_ptrs = hw_ptr + h * shw_h + offs_d[:, None] * shw_i + offs_d[None, :] * shw_j
        bias = tl.load(hb_ptr + h * shb_h + offs_d * shb_d, mask=dm, other=0.0).to(tl.float32)
    for c in range(0, c_hi):
        t = c * BLOCK_T + offs_t
        tm = t < Tk
        k = tl.load(k_base + t[:, None] * skt + offs_d[None, :] * skd,
                    mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_base + t[:, None] * svt + offs_v[None, :] * svd,
                    mask=tm[:, None] & vm[None, :], other=0.0)
        if not LOWP:
            v = v.to(tl.float32)
        if KIND == K_HEDGEHOG:
            w = tl.load(w_ptrs, mask=dm[:, None] & dm[None, :], other=0.0)
            w = w.to(DT) if LOWP else w.to(tl.float32)
            pk = mm(k, w, LOWP, DT) + bias[None, :]
            fk = tl.where(tm[:, None], softmax_rows(pk, dm), 0.0)
            fk2 = tl.where(tm[:, None], softmax_rows(-pk, dm), 0.0)
        else:
            fk = tl.where(tm[:, None] & dm[None, :], elu_phi(k), 0.0)
        if c >= c_lo:  # this segment's chunks (they hold queries: c_lo is past any prefix)
            qi = t - shift
            qm = (qi >= 0) & tm
            q = tl.load(q_base + qi[:, None] * sqt + offs_d[None, :] * sqd,
                        mask=qm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            if KIND == K_HEDGEHOG:
                pq = mm(q, w, LOWP, DT) + bias[None, :]
                fq = softmax_rows(pq, dm)
                fq2 = softmax_rows(-pq, dm)
                a = mm(fq, tl.trans(fk), LOWP, DT) + mm(fq2, tl.trans(fk2), LOWP, DT)
                a = tl.where(causal, a, 0.0)
                numer = mm(fq, s1, LOWP, DT) + mm(fq2, s2, LOWP, DT) + mm(a, v, LOWP, DT)
                den = tl.sum(fq * z1[None, :], axis=1) + tl.sum(fq2 * z2[None, :], axis=1)
            else:
                fq = tl.where(dm[None, :], elu_phi(q), 0.0)
                a = tl.where(causal, mm(fq, tl.trans(fk), LOWP, DT), 0.0)
                numer = mm(fq, s1, LOWP, DT) + mm(a, v, LOWP, DT)
                den = tl.sum(fq * z1[None, :], axis=1)
            o = numer / (den + tl.sum(a, axis=1) + EPS)[:, None]
            if FUSE == 1:
                fscale = tl.load(fs_ptr + h * sfs).to(tl.float32)
                rms_inv = 1.0 / tl.sqrt(tl.sum(o * o, axis=1) / Dv + EPS)
                o = o * (fscale * rms_inv)[:, None]
            if FUSE == 2:
                tl.store(ss_ptr + b * ssb + h * ssh + vb * ssv + qi, tl.sum(o * o, axis=1), mask=qm)
            tl.store(o_ptr + b * sob + h * soh + qi[:, None] * sot + offs_v[None, :] * sod,
                     o.to(o_ptr.dtype.element_ty), mask=qm[:, None] & vm[None, :])
        s1 += mm(tl.trans(fk), v, LOWP, DT)
        z1 += tl.sum(fk, axis=0)
        if KIND == K_HEDGEHOG:
            s2 += mm(tl.trans(fk2), v, LOWP, DT)
            z2 += tl.sum(fk2, axis=0)
    if STORE_STATE:
        if c_hi * BLOCK_T >= Tk:
            s_ptrs = st_ptr + b * sstb + slot * ssth + offs_d[:, None] * sstf + offs_v[None, :] * sstd
            z_ptrs = zt_ptr + b * sztb + slot * szth + offs_d * sztf
            tl.store(s_ptrs, s1, mask=dm[:, None] & vm[None, :])
            tl.store(z_ptrs, z1, mask=dm & (vb == 0))
            if KIND == K_HEDGEHOG:
                tl.store(s_ptrs + D * sstf, s2, mask=dm[:, None] & vm[None, :])
                tl.store(z_ptrs + D * sztf, z2, mask=dm & (vb == 0))


@triton.jit
def _prefill_kernel(
    io, io_st, params, params_st, ss_ptr, ss_st, states, states_st, slot_ptr, items_ptr, offsets_ptr, win_ptr,
    Tq, Tk, D, Dv, GROUP, qk_scale,
    HAS_SOFTMAX: tl.constexpr, HAS_ELU: tl.constexpr, HAS_HEDGEHOG: tl.constexpr,
    ELU_FUSE: tl.constexpr, HH_FUSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ELU_BT: tl.constexpr, HH_BT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ELU_BDV: tl.constexpr, HH_BDV: tl.constexpr,
    LOWP: tl.constexpr, LIN_LOWP: tl.constexpr, STORE_STATE: tl.constexpr,
):
    """Persistent program: run work items ``offsets[pid] .. offsets[pid + 1] - 1``.

    ``LIN_LOWP``: low-precision dot operands in the linear heads (off for fp16, whose range the
    running state ``S = sum phi(k) v^T`` and the chunk weights outgrow on long sequences)."""
    pid = tl.program_id(0)
    start = tl.load(offsets_ptr + pid)
    end = tl.load(offsets_ptr + pid + 1)
    for it in range(start, end):
        kind = tl.load(items_ptr + ITEM * it)
        b = tl.load(items_ptr + ITEM * it + 1)
        h = tl.load(items_ptr + ITEM * it + 2)
        blk = tl.load(items_ptr + ITEM * it + 3)
        c_lo = tl.load(items_ptr + ITEM * it + 4)
        c_hi = tl.load(items_ptr + ITEM * it + 5)
        if HAS_SOFTMAX:
            if (kind == K_FULL) | (kind == K_STREAMING):
                sink = tl.load(win_ptr + 2 * h)
                window = tl.load(win_ptr + 2 * h + 1)
                _softmax_tile(
                    io, io_st, b, h, blk, sink, window, kind == K_STREAMING, GROUP, Tq, Tk, D, Dv, qk_scale,
                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
        if HAS_ELU:
            if kind == K_ELU:
                _linear_seq(
                    io, io_st, params, params_st, ss_ptr, ss_st, states[0], states_st[0], tl.load(slot_ptr + h),
                    b, h, blk, c_lo, c_hi, GROUP, Tq, Tk, D, Dv,
                    K_ELU, ELU_FUSE, ELU_BT, BLOCK_D, ELU_BDV, LIN_LOWP, STORE_STATE)
        if HAS_HEDGEHOG:
            if kind == K_HEDGEHOG:
                _linear_seq(
                    io, io_st, params, params_st, ss_ptr, ss_st, states[1], states_st[1], tl.load(slot_ptr + h),
                    b, h, blk, c_lo, c_hi, GROUP, Tq, Tk, D, Dv,
                    K_HEDGEHOG, HH_FUSE, HH_BT, BLOCK_D, HH_BDV, LIN_LOWP, STORE_STATE)


@triton.jit
def _fusion_epilogue(
    o_ptr, sq_ptr, fs_ptr, heads_ptr, sob, soh, sot, sod, ssb, ssh, ssv, sfs, Tq, Dv, NH,
    BLOCK_T: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Scale-normalized fusion of linear heads whose value dim was split over v-blocks."""
    pid = tl.program_id(0)
    b = pid // NH
    h = tl.load(heads_ptr + 2 * (pid % NH))
    nv = tl.load(heads_ptr + 2 * (pid % NH) + 1)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    dv = tl.arange(0, BLOCK_DV)
    tm = t < Tq
    mask = tm[:, None] & (dv < Dv)[None, :]
    ptrs = o_ptr + b * sob + h * soh + t[:, None] * sot + dv[None, :] * sod
    o = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    for vb in range(0, nv):
        ss += tl.load(sq_ptr + b * ssb + h * ssh + vb * ssv + t, mask=tm, other=0.0)
    fscale = tl.load(fs_ptr + h * sfs).to(tl.float32)
    o = o * (fscale / tl.sqrt(ss / Dv + EPS))[:, None]
    tl.store(ptrs, o.to(o_ptr.dtype.element_ty), mask=mask)


# --- host side ----------------------------------------------------------------------------


def _softmax_blocks(mblk: int, shift: int, tq: int, cfg: PrefillConfig, stream: bool, sink: int, window: int) -> int:
    """Key blocks a softmax tile visits (as in ``_softmax_tile``)."""
    p_first = mblk * cfg.block_m + shift
    p_last = min(mblk * cfg.block_m + cfg.block_m, tq) - 1 + shift
    n_end = p_last // cfg.block_n + 1
    if not stream:
        return n_end
    n_sink = min(-(-sink // cfg.block_n), n_end)
    n_lo = max(max(p_first - window + 1, 0) // cfg.block_n, n_sink)
    return n_sink + max(0, n_end - n_lo)


def _segments(first: int, chunks: int, state_cost: float, out_cost: float, target: float) -> list[tuple[int, int]]:
    """Split output chunks ``[first, chunks)`` of a linear sequence into segments ``(c_lo, c_hi)``.

    A segment costs ``c_hi`` state updates plus ``c_hi - c_lo`` outputs. Use the fewest
    segments whose most expensive one fits ``target`` (the average load of a program), or
    stop when more segments no longer shorten the longest by 10%.
    """
    n_out = chunks - first

    def split(n: int) -> list[tuple[int, int]]:
        bounds = [first + (n_out * i) // n for i in range(n + 1)]
        return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]

    def longest(segs: list[tuple[int, int]]) -> float:
        return max(hi * state_cost + (hi - lo) * out_cost for lo, hi in segs)

    best = split(1)
    n = 1
    while longest(best) > target and n < n_out:
        n = min(n_out, n * 2)
        trial = split(n)
        if longest(trial) > 0.9 * longest(best):
            break
        best = trial
    return best


@functools.lru_cache(maxsize=64)
def work_plan(
    kinds: tuple[int, ...],
    windows: tuple[int, ...],
    batch: int,
    tq: int,
    tk: int,
    d: int,
    dv: int,
    cfg: PrefillConfig,
    programs: int,
) -> tuple[list[list[int]], list[int]]:
    """The prefill work list, dealt out to ``programs`` programs.

    Returns ``(items, offsets)``: ``items`` rows ``[kind, b, h, block, c_lo, c_hi]`` grouped by
    program (``block``: the query block of a softmax tile, the value block of a linear item;
    ``c_lo, c_hi``: a linear item's chunk segment), ``offsets`` ``programs + 1`` ints (program
    p runs ``items[offsets[p]:offsets[p + 1]]``). Costs are estimated multiply-adds (a linear
    chunk weighted by ``cfg.linear_cost``, for its serial latency); linear sequences are cut
    into segments when one would exceed the average load; items go, most expensive first, to
    the least loaded program (LPT) and run in that order.
    """
    shift = tk - tq
    bd, bdv = dot_block(d), dot_block(dv)
    m_blocks = -(-tq // cfg.block_m)
    per_block = cfg.block_m * cfg.block_n * (bd + bdv)
    softmax: list[tuple[float, tuple[int, ...]]] = []
    for h, code in enumerate(kinds):
        if code in _SOFTMAX_KINDS:
            sink, window = windows[2 * h], windows[2 * h + 1]
            for m in range(m_blocks):
                blocks = _softmax_blocks(m, shift, tq, cfg, code == STREAMING.code, sink, window)
                softmax += [((blocks + 1) * per_block, (code, b, h, m, 0, 0)) for b in range(batch)]
    # per linear kind: (code, chunks, first output chunk, state cost, output cost, v-blocks)
    linear: list[tuple[int, int, int, float, float, int]] = []
    for code in sorted({c for c in kinds if c in _TRITON_LINEAR}):
        block_dv = cfg.elu_block_dv if code == ELU.code else cfg.hedgehog_block_dv
        bt = cfg.block_t if code == ELU.code else cfg.hedgehog_block_t
        f = state_shapes(code, 1, 1, bd, 1)[0][2]  # state rows per head
        proj = 0 if code == ELU.code else bt * bd * bd
        state = cfg.linear_cost * (bt * f * block_dv + proj)
        out = cfg.linear_cost * (bt * f * block_dv + bt * bt * (f + block_dv) + proj)
        linear.append((code, -(-tk // bt), shift // bt, state, out, -(-dv // block_dv)))
    total = sum(c for c, _ in softmax) + sum(
        kinds.count(code) * batch * nv * (chunks * state + (chunks - first) * out)
        for code, chunks, first, state, out, nv in linear
    )
    target = total / programs
    work = list(softmax)
    for code, chunks, first, state, out, nv in linear:
        for lo, hi in _segments(first, chunks, state, out, target):
            cost = hi * state + (hi - lo) * out
            work += [
                (cost, (code, b, h, vb, lo, hi))
                for h, c in enumerate(kinds) if c == code
                for b in range(batch)
                for vb in range(nv)
            ]
    work.sort(key=lambda w: (-w[0], w[1]))
    bins: list[list[list[int]]] = [[] for _ in range(programs)]
    heap = [(0.0, p) for p in range(programs)]
    for cost, item in work:
        load, p = heapq.heappop(heap)
        bins[p].append(list(item))
        heapq.heappush(heap, (load + cost, p))
    items = [item for program in bins for item in program]
    offsets = [0]
    for program in bins:
        offsets.append(offsets[-1] + len(program))
    return items, offsets


_DEVICE_PLANS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _device_plan(key: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    """``work_plan(*key)`` as int32 tensors on ``device`` (cached)."""
    cache_key = (*key, str(device))
    found = _DEVICE_PLANS.get(cache_key)
    if found is None:
        items, offsets = work_plan(*key)
        found = (
            torch.tensor(items or [[0] * 6], dtype=torch.int32, device=device),
            torch.tensor(offsets, dtype=torch.int32, device=device),
        )
        if len(_DEVICE_PLANS) > 256:
            _DEVICE_PLANS.clear()
        _DEVICE_PLANS[cache_key] = found
    return found


def prefill_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`hybrid_prefill` takes inputs like these (else use the composed op): head
    dims up to 128, q, k, v of one dtype among fp32/fp16/bf16. Static properties only, so the
    op's fake implementation can ask it under symbolic shapes; see also :func:`prefill_fits`."""
    return (
        supported_head_dims(q.shape[-1], v.shape[-1])
        and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and k.dtype == q.dtype
        and v.dtype == q.dtype
    )


def prefill_fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether every offset the kernel computes fits int32 (inputs and the output)."""
    return fits_int32(q, k, v) and q.shape[0] * q.shape[1] * q.shape[2] * v.shape[-1] < 2**31


def hybrid_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
    *,
    out: Tensor | None = None,
    states: Sequence[Tensor] | None = None,
    config: PrefillConfig | None = None,
) -> Tensor:
    """The hybrid layer with the fused Triton kernel; same contract as ``hybrid_attention_reference``.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]`` (unexpanded GQA, any
    strides, bf16/fp16/fp32). ``out``: where to write, a ``[B, Hq, Tq, Dv]`` tensor (any
    strides; tests pass a NaN-filled one); by default a fresh ``[B, Tq, Hq, Dv]`` buffer's
    ``transpose(1, 2)`` view. Every element of ``out`` is written. Returns ``out``.
    ``states``: optional fp32 tensors laid out as ``hybrid_decode``'s (``layout.decode_layout``:
    per linear kind by code, ``S [B, H_kind, F, Dv]`` and ``z [B, H_kind, F]``, gdn ``S`` only),
    overwritten with the linear heads' state after the last key: a prefill from an empty cache
    (needs Tq == Tk) hands decode its starting state. gdn heads run through the torch reference
    (see the module docstring).
    """
    validate_hybrid_inputs(q, k, v, head_kinds, head_params, head_windows)
    b, hq, tq, d = q.shape
    dv = v.shape[-1]
    unknown = sorted({int(c) for c in head_kinds} - set(PREFILL_KINDS))
    if unknown:
        raise ValueError(f"hybrid_prefill has no branch for head kind codes {unknown} (see PREFILL_KINDS)")
    if not (prefill_supported(q, k, v) and prefill_fits(q, k, v)):
        raise ValueError(
            f"hybrid_prefill takes head dims up to 128, q, k, v of one dtype (fp32/fp16/bf16) and "
            f"int32 offsets; got D={d}, Dv={dv}, {q.dtype}/{k.dtype}/{v.dtype}, shapes {list(q.shape)}, {list(k.shape)}"
        )
    if out is None:
        out = q.new_empty(b, tq, hq, dv).transpose(1, 2)
    elif tuple(out.shape) != (b, hq, tq, dv):
        raise ValueError(f"out must have shape {[b, hq, tq, dv]}, got {list(out.shape)}")
    layout = decode_layout(tuple(int(c) for c in head_kinds), hq, k.shape[1])
    state_of = _states_by_kind(layout, states, b, d, dv, tq, k.shape[2])
    cfg = config or default_config(d, dv, q.dtype)
    if cfg.full_heads not in FULL_HEADS_MODES:
        raise ValueError(f"PrefillConfig.full_heads must be one of {FULL_HEADS_MODES}, got {cfg.full_heads!r}")
    if tq == 0:
        return out
    with on_device(q):
        _launch(q, k, v, head_kinds, scale, head_params, head_windows, out, cfg, layout, state_of)
    return out


def _states_by_kind(
    layout: DecodeLayout, states: Sequence[Tensor] | None, b: int, d: int, dv: int, tq: int, tk: int
) -> dict[int, tuple[Tensor, ...]] | None:
    """``states`` checked against the layout and grouped ``{kind code: (S, z) or (S,)}``."""
    if states is None:
        return None
    if tq != tk:
        raise ValueError(f"states are only written by a prefill from an empty cache (Tq == Tk), got Tq={tq}, Tk={tk}")
    expected, state_of, it = [], {}, iter(states)
    for code, heads in layout.linear:
        shapes = list(state_shapes(code, b, len(heads), d, dv))
        expected += shapes
        state_of[code] = tuple(next(it, None) for _ in shapes)
    got = [tuple(t.shape) for t in states]
    if got != expected or any(t.dtype != torch.float32 for t in states):
        raise ValueError(f"states must be fp32 tensors of shapes {expected} (see decode_layout); got {got}")
    return state_of


def _launch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
    out: Tensor,
    cfg: PrefillConfig,
    layout: DecodeLayout,
    state_of: dict[int, tuple[Tensor, ...]] | None,
) -> None:
    b, hq, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
    kinds = tuple(int(c) for c in head_kinds)
    windows = tuple(int(w) for w in head_windows) or (0,) * (2 * hq)
    fusion = len(head_params) > 0
    bdv = dot_block(dv)
    elu_bdv, hh_bdv = min(cfg.elu_block_dv, bdv), min(cfg.hedgehog_block_dv, bdv)

    def fuse_mode(block_dv: int) -> int:
        return 0 if not fusion else (1 if block_dv >= dv else 2)

    elu_fuse, hh_fuse = fuse_mode(elu_bdv), fuse_mode(hh_bdv)
    programs = cfg.num_programs or cfg.programs_per_sm * num_sms(q.device)
    plan_cfg = dataclasses.replace(cfg, elu_block_dv=elu_bdv, hedgehog_block_dv=hh_bdv, full_heads="triton")
    sdpa = sdpa_head_range(kinds, hq // hkv, tq, tk) if cfg.full_heads != "triton" else None
    side = None
    if sdpa is not None:  # full heads by SDPA; the kernel's plan skips them (code -1 makes no items)
        kinds = tuple(-1 if sdpa[0] <= h < sdpa[1] else c for h, c in enumerate(kinds))
        side = _full_heads_sdpa(q, k, v, scale, out, sdpa, cfg.full_heads == "sdpa-stream")
    try:  # the caller's stream joins the side stream even when the kernel fails to launch
        if any(c in _SOFTMAX_KINDS or c in _TRITON_LINEAR for c in kinds):
            items, offsets = _device_plan((kinds, windows, b, tq, tk, d, dv, plan_cfg, programs), q.device)
            win = _int_table(windows, q.device)
            if fusion:
                fs, hw, hb = head_params[0], head_params[1], head_params[2]
            else:
                fs = hw = hb = q
            fs_strides = (fs.stride(0),) if fusion else (0,)
            hw_strides = hw.stride() if fusion else (0, 0, 0)
            hb_strides = hb.stride() if fusion else (0, 0)
            present = set(kinds)
            split = (ELU.code in present and elu_fuse == 2) or (HEDGEHOG.code in present and hh_fuse == 2)
            nv_max = -(-dv // min(elu_bdv, hh_bdv))
            sq = torch.empty(b, hq, nv_max, tq, dtype=torch.float32, device=q.device) if split else q.new_empty(1, 1, 1, 1, dtype=torch.float32)
            store = state_of is not None
            se, ze = (state_of or {}).get(ELU.code, (sq, sq))
            sh, zh = (state_of or {}).get(HEDGEHOG.code, (sq, sq))
            slots = [0] * hq
            for _, heads in layout.linear:
                for i, h in enumerate(heads):
                    slots[h] = i
            _prefill_kernel[(programs,)](
                (q, k, v, out), (q.stride(), k.stride(), v.stride(), out.stride()),
                (fs, hw, hb), (fs_strides, hw_strides, hb_strides), sq, tuple(sq.stride()[:3]),
                ((se, ze), (sh, zh)), ((se.stride()[:4], ze.stride()[:3]), (sh.stride()[:4], zh.stride()[:3])),
                _int_table(tuple(slots), q.device), items, offsets, win,
                tq, tk, d, dv, hq // hkv, float(scale) * LOG2E,
                HAS_SOFTMAX=bool(present & set(_SOFTMAX_KINDS)),
                HAS_ELU=ELU.code in present,
                HAS_HEDGEHOG=HEDGEHOG.code in present,
                ELU_FUSE=elu_fuse,
                HH_FUSE=hh_fuse,
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                ELU_BT=cfg.block_t,
                HH_BT=cfg.hedgehog_block_t,
                BLOCK_D=dot_block(d),
                BLOCK_DV=bdv,
                ELU_BDV=elu_bdv,
                HH_BDV=hh_bdv,
                LOWP=dot_mode(q.dtype),
                LIN_LOWP=dot_mode(q.dtype) and q.dtype != torch.float16,
                STORE_STATE=store,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
            )
            if split:
                rows = [
                    (h, -(-dv // (elu_bdv if c == ELU.code else hh_bdv)))
                    for h, c in enumerate(kinds)
                    if (c == ELU.code and elu_fuse == 2) or (c == HEDGEHOG.code and hh_fuse == 2)
                ]
                heads = _int_table(tuple(x for row in rows for x in row), q.device)
                block_t = 64 if bdv <= 128 else 32
                _fusion_epilogue[(b * len(rows), triton.cdiv(tq, block_t))](
                    out, sq, fs, heads, *out.stride(), sq.stride(0), sq.stride(1), sq.stride(2), fs.stride(0),
                    tq, dv, len(rows), BLOCK_T=block_t, BLOCK_DV=bdv, num_warps=4,
                )
        for code in sorted({c for c in kinds if c in TORCH_KINDS}):
            heads = [h for h, c in enumerate(kinds) if c == code]
            _torch_heads(q, k, v, code, heads, head_params, out, None if state_of is None else state_of[code])
    finally:
        if side is not None:
            torch.cuda.current_stream(q.device).wait_stream(side)


def sdpa_head_range(kinds: Sequence[int], group: int, tq: int, tk: int) -> tuple[int, int] | None:
    """``(h0, h1)`` when the full heads are exactly query heads ``h0 .. h1 - 1``, whole KV groups
    (so their KV heads are ``h0 // group .. h1 // group - 1`` and no other head's), and the
    causal mask is SDPA's (Tq == Tk); else None."""
    full = [h for h, c in enumerate(kinds) if c == FULL.code]
    if not full or tq != tk:
        return None
    h0, h1 = full[0], full[-1] + 1
    if h1 - h0 != len(full) or h0 % group or h1 % group:
        return None
    return h0, h1


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _full_heads_sdpa(
    q: Tensor, k: Tensor, v: Tensor, scale: float, out: Tensor, heads: tuple[int, int], concurrent: bool
) -> torch.cuda.Stream | None:
    """Full heads ``heads`` through SDPA on strided slices (no gather), written into ``out``.
    ``concurrent`` (CUDA): on a side stream the caller joins later; returns that stream."""
    h0, h1 = heads
    group = q.shape[1] // k.shape[1]
    kv = slice(h0 // group, h1 // group)

    def run() -> None:
        res = torch.nn.functional.scaled_dot_product_attention(
            q[:, h0:h1], k[:, kv], v[:, kv], is_causal=True, scale=scale, enable_gqa=group > 1
        )
        out[:, h0:h1].copy_(res)

    if not (concurrent and q.is_cuda):
        run()
        return None
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(q.device)
    side.wait_stream(torch.cuda.current_stream(q.device))
    with torch.cuda.stream(side):
        run()
    return side


_INT_TABLES: dict[tuple, Tensor] = {}


def _int_table(values: tuple[int, ...], device: torch.device) -> Tensor:
    """A small cached int32 tensor on ``device``."""
    key = (values, str(device))
    found = _INT_TABLES.get(key)
    if found is None:
        found = torch.tensor(values or (0,), dtype=torch.int32, device=device)
        if len(_INT_TABLES) > 1024:
            _INT_TABLES.clear()
        _INT_TABLES[key] = found
    return found


def _torch_heads(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    code: int,
    heads: list[int],
    head_params: Sequence[Tensor],
    out: Tensor,
    state: tuple[Tensor, ...] | None,
) -> None:
    """Linear heads of kind ``code`` through the kind's torch ``step`` from an empty state (gdn:
    the chunked form), fused when ``head_params`` is given, written into ``out``; the final state
    into ``state`` when given."""
    group = q.shape[1] // k.shape[1]
    q_idx = torch.tensor(heads, device=q.device)
    kv_idx = q_idx // group
    rows = select_param_rows(head_params, q_idx)
    step = kind_by_code(code).step
    assert step is not None
    res, final = step(
        q.index_select(1, q_idx).float(), k.index_select(1, kv_idx).float(), v.index_select(1, kv_idx).float(),
        None, rows or None,
    )
    if rows:
        res = fuse_linear_output(res, rows["fusion_scale"])
    out.index_copy_(1, q_idx, res.to(out.dtype))
    if state is not None:
        for old, fresh in zip(state, final, strict=True):
            old.copy_(fresh)
