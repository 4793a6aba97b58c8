"""Fused Triton decode step for ``hydracc::hybrid_decode``: one new token, a whole layer.

Design decisions (measurements and tuning notes: ``benchmarks/README.md``):
- One launch, one program per work item, most expensive first: softmax items (a batch row and
  a cached KV head, with *all* full query heads reading it as the rows of one tile, so each key
  is loaded once per KV head as in SDPA's ``enable_gqa``; a key range when split), streaming
  items (the same over the window cache, masked by absolute positions per row), and linear
  items (a batch row and a linear head: elu, hedgehog and gdn are all fused here).
- Flash-decoding split: when batch x cached KV heads gives fewer programs than about two per SM,
  the keys of full heads are split into ranges; each range writes fp32 partials (max, sum,
  accumulator) and a second small launch combines them.
- Linear heads update their fp32 state in place, ``BLOCK_F`` state rows at a time (the whole
  state never sits in registers); the math is each kind's ``step`` in ``kinds/`` (the
  reference is ``naive.hybrid_decode_reference``). Hedgehog's projection is computed once as a
  vector and each block of rows picks its slice with a masked reduction. Fusion is applied in
  the program (it holds the whole value row).
- Arguments travel grouped as Triton tuples (pointers with their strides), kind codes are
  ``tl.constexpr`` values taken from the kind table; the host carries ``layout.DecodeTensors``.
- The caller (the hybrid cache) appends the new token to ``keys``/``values`` and the window
  cache before the call, exactly as its torch path does; this op only reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hydracc.kernels.kinds import ELU, FULL, GDN, HEDGEHOG, STREAMING
from hydracc.kernels.layout import DecodeLayout, DecodeTensors, split_states, validate_decode_inputs
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
    softplus,
    supported_head_dims,
)

ITEM = tl.constexpr(5)  # int32 fields per work item: kind, b, x, y, slot
K_FULL = tl.constexpr(FULL.code)
K_ELU = tl.constexpr(ELU.code)
K_HEDGEHOG = tl.constexpr(HEDGEHOG.code)
K_GDN = tl.constexpr(GDN.code)
K_STREAMING = tl.constexpr(STREAMING.code)


@triton.jit
def _pick(vec, offs, idx):
    """``vec[idx]`` for a block of indices ``idx`` (a register gather: masked reduction)."""
    return tl.sum(tl.where(offs[None, :] == idx[:, None], vec[None, :], 0.0), axis=1)


@triton.jit
def _decode_attend(
    io, io_st, k_base, v_base, kv_st, pos_ptr, part_ptr, heads, b, lo, hi, p_query, sink_r, win_r,
    part_row, D, Dv, qk_scale,
    HAS_POS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, LOWP: tl.constexpr,
):
    """Softmax of the query rows ``heads`` (-1: padding) over cached keys ``[lo, hi)``.

    ``io``: (q, k_new, v_new, out) and ``io_st`` their strides; ``kv_st``: the cache's key and
    value strides over (T, D)."""
    q_ptr, _, _, o_ptr = io
    sq, _, _, so = io_st
    sqb, sqh, sqd = sq
    sob, soh, sod = so
    sk, sv = kv_st
    skt, skd = sk
    svt, svd = sv
    DT = k_base.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    hm = heads >= 0
    hh = tl.where(hm, heads, 0)
    q = tl.load(q_ptr + b * sqb + hh[:, None] * sqh + offs_d[None, :] * sqd,
                mask=hm[:, None] & (offs_d < D)[None, :], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for n in range(lo, hi, BLOCK_N):
        j = n + offs_n
        jm = j < hi
        k = tl.load(k_base + j[:, None] * skt + offs_d[None, :] * skd,
                    mask=jm[:, None] & (offs_d < D)[None, :], other=0.0)
        v = tl.load(v_base + j[:, None] * svt + offs_dv[None, :] * svd,
                    mask=jm[:, None] & (offs_dv < Dv)[None, :], other=0.0)
        if not LOWP:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = mm(q, tl.trans(k), LOWP, DT) * qk_scale
        ok = jm[None, :]
        if HAS_POS:
            pos = tl.load(pos_ptr + j, mask=jm, other=0)
            ok = ok & (pos[None, :] <= p_query)
            ok = ok & ((pos[None, :] < sink_r[:, None]) | (pos[None, :] > p_query - win_r[:, None]))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mm(p, v, LOWP, DT)
        m_i = m_new
    if PARTIAL:  # rows of [m, l, acc...] at part_row
        rows = part_row + tl.arange(0, BLOCK_H)
        width = BLOCK_DV + 2
        tl.store(part_ptr + rows * width, m_i)
        tl.store(part_ptr + rows * width + 1, l_i)
        tl.store(part_ptr + rows[:, None] * width + 2 + offs_dv[None, :], acc)
    else:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * sob + hh[:, None] * soh + offs_dv[None, :] * sod,
                 o.to(o_ptr.dtype.element_ty), mask=hm[:, None] & (offs_dv < Dv)[None, :])


@triton.jit
def _decode_linear(
    io, io_st, state, state_st, params, params_st, b, h, slot, GROUP, D, Dv,
    KIND: tl.constexpr, FUSION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One linear head ``h`` (state row ``slot`` of its kind): update the state, write the output.

    ``state``: the kind's (S, z) (gdn: (S, S), z unused), ``params``: the five ``head_params``;
    each with its strides in the matching ``*_st`` tuple."""
    q_ptr, kn_ptr, vn_ptr, o_ptr = io
    sq, skn, svn, so = io_st
    sqb, sqh, sqd = sq
    sknb, sknh, sknd = skn
    svnb, svnh, svnd = svn
    sob, soh, sod = so
    s_ptr, z_ptr = state
    ss, sz = state_st
    ssb, ssh, ssf, ssd = ss
    szb, szh, szf = sz
    fs_ptr, hw_ptr, hb_ptr, gw_ptr, gb_ptr = params
    sfs_t, shw, shb, sgw, sgb = params_st
    sfs = sfs_t[0]
    shw_h, shw_i, shw_j = shw
    shb_h, shb_d = shb
    sgw_h, sgw_d, sgw_g = sgw
    sgb_h, sgb_g = sgb
    hk = h // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = tl.arange(0, BLOCK_DV)
    dm = offs_d < D
    vm = offs_v < Dv
    q_base = q_ptr + b * sqb + h * sqh
    k_base = kn_ptr + b * sknb + hk * sknh
    v = tl.load(vn_ptr + b * svnb + hk * svnh + offs_v * svnd, mask=vm, other=0.0).to(tl.float32)
    s_base = s_ptr + b * ssb + slot * ssh
    z_base = z_ptr + b * szb + slot * szh
    numer = tl.zeros([BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([BLOCK_F], dtype=tl.float32)
    if KIND == K_ELU:  # elu: phi is elementwise, each block of rows loads its own slice
        for f0 in range(0, D, BLOCK_F):
            f = f0 + offs_f
            fm = f < D
            fq = tl.where(fm, elu_phi(tl.load(q_base + f * sqd, mask=fm, other=0.0).to(tl.float32)), 0.0)
            fk = tl.where(fm, elu_phi(tl.load(k_base + f * sknd, mask=fm, other=0.0).to(tl.float32)), 0.0)
            sp = s_base + f[:, None] * ssf + offs_v[None, :] * ssd
            smask = fm[:, None] & vm[None, :]
            s = tl.load(sp, mask=smask, other=0.0) + fk[:, None] * v[None, :]
            tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=smask)
            z = tl.load(z_base + f * szf, mask=fm, other=0.0) + fk
            tl.store(z_base + f * szf, z.to(z_ptr.dtype.element_ty), mask=fm)
            numer += tl.sum(fq[:, None] * s, axis=0)
            den += fq * z
        o = numer / (tl.sum(den, axis=0) + EPS)
    if KIND == K_HEDGEHOG:  # hedgehog: projections as vectors, then rows [0, D) positive, [D, 2D) negative
        xq = tl.load(q_base + offs_d * sqd, mask=dm, other=0.0).to(tl.float32)
        xk = tl.load(k_base + offs_d * sknd, mask=dm, other=0.0).to(tl.float32)
        pq = tl.load(hb_ptr + h * shb_h + offs_d * shb_d, mask=dm, other=0.0).to(tl.float32)
        pk = pq
        for i0 in range(0, D, BLOCK_F):
            i = i0 + offs_f
            im = i < D
            w = tl.load(hw_ptr + h * shw_h + i[:, None] * shw_i + offs_d[None, :] * shw_j,
                        mask=im[:, None] & dm[None, :], other=0.0).to(tl.float32)
            pq += tl.sum(_pick(xq, offs_d, i)[:, None] * w, axis=0)
            pk += tl.sum(_pick(xk, offs_d, i)[:, None] * w, axis=0)
        mq1 = tl.max(tl.where(dm, pq, float("-inf")), axis=0)
        mq2 = tl.max(tl.where(dm, -pq, float("-inf")), axis=0)
        mk1 = tl.max(tl.where(dm, pk, float("-inf")), axis=0)
        mk2 = tl.max(tl.where(dm, -pk, float("-inf")), axis=0)
        lq1 = tl.sum(tl.where(dm, tl.exp(pq - mq1), 0.0), axis=0)
        lq2 = tl.sum(tl.where(dm, tl.exp(-pq - mq2), 0.0), axis=0)
        lk1 = tl.sum(tl.where(dm, tl.exp(pk - mk1), 0.0), axis=0)
        lk2 = tl.sum(tl.where(dm, tl.exp(-pk - mk2), 0.0), axis=0)
        for half in tl.static_range(2):
            for f0 in range(0, D, BLOCK_F):
                f = f0 + offs_f
                fm = f < D
                pqf = _pick(pq, offs_d, f)
                pkf = _pick(pk, offs_d, f)
                if half == 0:
                    fq = tl.where(fm, tl.exp(pqf - mq1) / lq1, 0.0)
                    fk = tl.where(fm, tl.exp(pkf - mk1) / lk1, 0.0)
                else:
                    fq = tl.where(fm, tl.exp(-pqf - mq2) / lq2, 0.0)
                    fk = tl.where(fm, tl.exp(-pkf - mk2) / lk2, 0.0)
                row = half * D + f
                sp = s_base + row[:, None] * ssf + offs_v[None, :] * ssd
                smask = fm[:, None] & vm[None, :]
                s = tl.load(sp, mask=smask, other=0.0) + fk[:, None] * v[None, :]
                tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=smask)
                z = tl.load(z_base + row * szf, mask=fm, other=0.0) + fk
                tl.store(z_base + row * szf, z.to(z_ptr.dtype.element_ty), mask=fm)
                numer += tl.sum(fq[:, None] * s, axis=0)
                den += fq * z
        o = numer / (tl.sum(den, axis=0) + EPS)
    if KIND == K_GDN:  # gdn: gates from the raw key, L2-normalized q and k, two passes over S
        xq = tl.load(q_base + offs_d * sqd, mask=dm, other=0.0).to(tl.float32)
        xk = tl.load(k_base + offs_d * sknd, mask=dm, other=0.0).to(tl.float32)
        g_a = tl.sum(xk * tl.load(gw_ptr + h * sgw_h + offs_d * sgw_d, mask=dm, other=0.0).to(tl.float32), axis=0)
        g_b = tl.sum(xk * tl.load(gw_ptr + h * sgw_h + offs_d * sgw_d + sgw_g, mask=dm, other=0.0).to(tl.float32), axis=0)
        g_a += tl.load(gb_ptr + h * sgb_h).to(tl.float32)
        g_b += tl.load(gb_ptr + h * sgb_h + sgb_g).to(tl.float32)
        alpha = tl.exp(-softplus(g_a))
        beta = 1.0 / (1.0 + tl.exp(-g_b))
        qn = xq / tl.sqrt(tl.sum(xq * xq, axis=0) + EPS)
        kn = xk / tl.sqrt(tl.sum(xk * xk, axis=0) + EPS)
        read = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for f0 in range(0, D, BLOCK_F):
            f = f0 + offs_f
            fm = f < D
            s = tl.load(s_base + f[:, None] * ssf + offs_v[None, :] * ssd, mask=fm[:, None] & vm[None, :], other=0.0)
            read += tl.sum(_pick(kn, offs_d, f)[:, None] * s, axis=0)
        for f0 in range(0, D, BLOCK_F):
            f = f0 + offs_f
            fm = f < D
            sp = s_base + f[:, None] * ssf + offs_v[None, :] * ssd
            smask = fm[:, None] & vm[None, :]
            knf = _pick(kn, offs_d, f)
            s = tl.load(sp, mask=smask, other=0.0)
            s = alpha * (s - beta * knf[:, None] * read[None, :]) + beta * knf[:, None] * v[None, :]
            tl.store(sp, s.to(s_ptr.dtype.element_ty), mask=smask)
            numer += tl.sum(_pick(qn, offs_d, f)[:, None] * s, axis=0)
        o = numer
    if FUSION:
        o = o * (tl.load(fs_ptr + h * sfs).to(tl.float32) / tl.sqrt(tl.sum(o * o, axis=0) / Dv + EPS))
    tl.store(o_ptr + b * sob + h * soh + offs_v * sod, o.to(o_ptr.dtype.element_ty), mask=vm)


@triton.jit
def _decode_kernel(
    io, io_st, cache, cache_st, states, states_st, params, params_st,
    items_ptr, gheads_ptr, win_ptr, part_ptr,
    T, Tw, D, Dv, GROUP, qk_scale, SPLIT_LEN, NSPLIT, NGROUPS,
    HAS_FULL: tl.constexpr, HAS_STREAM: tl.constexpr, HAS_ELU: tl.constexpr,
    HAS_HH: tl.constexpr, HAS_GDN: tl.constexpr, FUSION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_F: tl.constexpr, LOWP: tl.constexpr,
):
    """One work item per program: ``[kind, b, x, y, slot]`` (see ``decode_plan``).

    ``io`` (q, k_new, v_new, out); ``cache`` (keys, values, window keys, window values, window
    positions); ``states`` per linear kind (elu, hedgehog, gdn), each (S, z); ``params`` the
    five ``head_params``; each ``*_st`` the matching strides (zeros for absent tensors)."""
    it = tl.program_id(0)
    kind = tl.load(items_ptr + ITEM * it)
    b = tl.load(items_ptr + ITEM * it + 1)
    x = tl.load(items_ptr + ITEM * it + 2)
    y = tl.load(items_ptr + ITEM * it + 3)
    slot = tl.load(items_ptr + ITEM * it + 4)
    keys_ptr, vals_ptr, wk_ptr, wv_ptr, wpos_ptr = cache
    sk, sv, swk, swv = cache_st
    if HAS_FULL:
        if kind == K_FULL:  # x: head group, y: key range
            heads = tl.load(gheads_ptr + x * BLOCK_H + tl.arange(0, BLOCK_H))
            lo = y * SPLIT_LEN
            hi = tl.minimum(lo + SPLIT_LEN, T)
            _decode_attend(
                io, io_st, keys_ptr + b * sk[0] + slot * sk[1], vals_ptr + b * sv[0] + slot * sv[1],
                ((sk[2], sk[3]), (sv[2], sv[3])), wpos_ptr, part_ptr, heads, b, lo, hi, 0, heads, heads,
                ((b * NGROUPS + x) * NSPLIT + y) * BLOCK_H, D, Dv, qk_scale,
                False, SPLIT, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
    if HAS_STREAM:
        if kind == K_STREAMING:  # x: head group; rows see j < sink or j > p - window by absolute position
            heads = tl.load(gheads_ptr + x * BLOCK_H + tl.arange(0, BLOCK_H))
            hh = tl.where(heads >= 0, heads, 0)
            sink_r = tl.load(win_ptr + 2 * hh)
            win_r = tl.load(win_ptr + 2 * hh + 1)
            p_query = tl.load(wpos_ptr + Tw - 1)
            _decode_attend(
                io, io_st, wk_ptr + b * swk[0] + slot * swk[1], wv_ptr + b * swv[0] + slot * swv[1],
                ((swk[2], swk[3]), (swv[2], swv[3])), wpos_ptr, part_ptr, heads, b, 0, Tw, p_query,
                sink_r, win_r, 0, D, Dv, qk_scale,
                True, False, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
    if HAS_ELU:
        if kind == K_ELU:
            _decode_linear(
                io, io_st, states[0], states_st[0], params, params_st, b, x, slot, GROUP, D, Dv,
                K_ELU, FUSION, BLOCK_D, BLOCK_DV, BLOCK_F)
    if HAS_HH:
        if kind == K_HEDGEHOG:
            _decode_linear(
                io, io_st, states[1], states_st[1], params, params_st, b, x, slot, GROUP, D, Dv,
                K_HEDGEHOG, FUSION, BLOCK_D, BLOCK_DV, BLOCK_F)
    if HAS_GDN:
        if kind == K_GDN:
            _decode_linear(
                io, io_st, states[2], states_st[2], params, params_st, b, x, slot, GROUP, D, Dv,
                K_GDN, FUSION, BLOCK_D, BLOCK_DV, BLOCK_F)


@triton.jit
def _decode_combine(
    o_ptr, part_ptr, gheads_ptr, sob, soh, sod, Dv, NSPLIT, NGROUPS,
    BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Merge the key-range partials of one (batch row, head group) of full heads."""
    pid = tl.program_id(0)
    b = pid // NGROUPS
    g = pid % NGROUPS
    heads = tl.load(gheads_ptr + g * BLOCK_H + tl.arange(0, BLOCK_H))
    offs_dv = tl.arange(0, BLOCK_DV)
    width = BLOCK_DV + 2
    m = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for s in range(0, NSPLIT):
        rows = ((b * NGROUPS + g) * NSPLIT + s) * BLOCK_H + tl.arange(0, BLOCK_H)
        m_s = tl.load(part_ptr + rows * width)
        l_s = tl.load(part_ptr + rows * width + 1)
        a_s = tl.load(part_ptr + rows[:, None] * width + 2 + offs_dv[None, :])
        m_new = tl.maximum(m, m_s)
        c_old = tl.exp2(m - m_new)
        c_new = tl.exp2(m_s - m_new)
        l_sum = l_sum * c_old + l_s * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m = m_new
    hm = heads >= 0
    hh = tl.where(hm, heads, 0)
    o = acc / tl.where(l_sum > 0.0, l_sum, 1.0)[:, None]
    tl.store(o_ptr + b * sob + hh[:, None] * soh + offs_dv[None, :] * sod,
             o.to(o_ptr.dtype.element_ty), mask=hm[:, None] & (offs_dv < Dv)[None, :])


# --- host side ----------------------------------------------------------------------------


def _head_groups(layout: DecodeLayout, kinds: tuple[int, ...]) -> tuple[list[tuple[int, int, list[int]]], int]:
    """Softmax head groups ``(code, cache slot, query heads)``: full heads by cached KV head,
    then streaming heads by window KV head; and ``BLOCK_H`` (rows per tile, >= 16)."""
    groups = []
    for code, kv_heads in ((FULL.code, layout.cached_kv), (STREAMING.code, layout.stream_kv)):
        for slot, kv in enumerate(kv_heads):
            heads = [h for h in range(len(kinds)) if kinds[h] == code and h // layout.group == kv]
            groups.append((code, slot, heads))
    widest = max((len(heads) for _, _, heads in groups), default=1)
    return groups, dot_block(widest)


@functools.lru_cache(maxsize=256)
def decode_plan(layout: DecodeLayout, kinds: tuple[int, ...], batch: int, nsplit: int) -> tuple[list[list[int]], list[list[int]], int, int]:
    """Work items ``[kind, b, x, y, slot]`` (most expensive first), the head-group table
    (``BLOCK_H`` query heads per group, -1 padded), ``BLOCK_H`` and the number of full groups.

    Full: ``x`` group, ``y`` key range, ``slot`` cached KV head; streaming: ``x`` group,
    ``slot`` window KV head; linear: ``x`` query head, ``slot`` its row in its kind's state.
    """
    groups, block_h = _head_groups(layout, kinds)
    n_full = sum(1 for code, _, _ in groups if code == FULL.code)
    table = [heads + [-1] * (block_h - len(heads)) for _, _, heads in groups]
    items: list[list[int]] = []
    for g, (code, slot, _) in enumerate(groups):
        if code == FULL.code:
            items += [[FULL.code, b, g, s, slot] for s in range(nsplit) for b in range(batch)]
    for code, heads in layout.linear:
        items += [[code, b, h, i, i] for i, h in enumerate(heads) for b in range(batch)]
    for g, (code, slot, _) in enumerate(groups):
        if code == STREAMING.code:
            items += [[STREAMING.code, b, g, 0, slot] for b in range(batch)]
    return items, table, block_h, n_full


@functools.lru_cache(maxsize=256)
def _device_plan(
    layout: DecodeLayout, kinds: tuple[int, ...], batch: int, nsplit: int, device: str
) -> tuple[int, Tensor, Tensor, int, int]:
    """``decode_plan`` as int32 tensors on ``device``: (items, items, head groups, BLOCK_H, full groups)."""
    items, table, block_h, n_groups = decode_plan(layout, kinds, batch, nsplit)
    dev = torch.device(device)
    items_t = torch.tensor(items or [[0] * 5], dtype=torch.int32, device=dev)
    heads_t = torch.tensor(table or [[-1] * block_h], dtype=torch.int32, device=dev)
    return len(items), items_t, heads_t, block_h, n_groups


_TABLES: dict[tuple, Tensor] = {}


def _table(values: tuple, device: torch.device) -> Tensor:
    key = (values, str(device))
    found = _TABLES.get(key)
    if found is None:
        found = torch.tensor(values, dtype=torch.int32, device=device)
        if len(_TABLES) > 1024:
            _TABLES.clear()
        _TABLES[key] = found
    return found


DECODE_KINDS = (FULL.code, ELU.code, HEDGEHOG.code, GDN.code, STREAMING.code)
"""The kinds the kernel has a branch for; a layer with another kind runs the reference."""


def decode_supported(t: DecodeTensors, head_kinds: Sequence[int] = ()) -> bool:
    """Whether :func:`decode_triton` takes these inputs (else the reference runs): kinds in
    ``DECODE_KINDS``, head dims up to 128, q/keys/values of one dtype among fp32/fp16/bf16, fp32
    states, int32 offsets."""
    kv = [x for x in (t.k_new, t.v_new, t.keys, t.values, t.window_keys, t.window_values) if x is not None]
    return (
        all(int(c) in DECODE_KINDS for c in head_kinds)
        and supported_head_dims(t.q.shape[-1], t.v_new.shape[-1])
        and t.q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(x.dtype == t.q.dtype for x in kv)
        and all(s.dtype == torch.float32 for s in t.states)
        and fits_int32(t.q, *kv, *t.states)
    )


def _split(t: int, programs: int, block_n: int, device: torch.device, nsplit: int | None) -> tuple[int, int]:
    """``(nsplit, keys per split)``: enough key ranges for ~2 programs per SM, >= 4 blocks each."""
    if nsplit is None:
        want = -(-2 * num_sms(device) // max(1, programs))
        nsplit = max(1, min(want, t // (4 * block_n)))
    nsplit = max(1, min(nsplit, -(-t // block_n)))
    per = -(-t // nsplit)
    per = -(-per // block_n) * block_n
    return -(-t // per), per


def hybrid_decode_triton(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    keys: Tensor | None,
    values: Tensor | None,
    states: Sequence[Tensor],
    window_keys: Tensor | None,
    window_values: Tensor | None,
    window_pos: Tensor | None,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
    **options: object,
) -> Tensor:
    """``hybrid_decode`` with the fused Triton kernel (the op's arguments, see
    ``decode_op.hybrid_decode``); keyword ``options`` as in :func:`decode_triton`."""
    t = DecodeTensors(q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos)
    return decode_triton(t, head_kinds, scale, head_params, head_windows, **options)  # type: ignore[arg-type]


def decode_triton(
    t: DecodeTensors,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
    *,
    out: Tensor | None = None,
    nsplit: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """One decode step of the layer over ``t`` with the fused kernel.

    ``out``: a ``[B, Hq, 1, Dv]`` tensor to write (any strides), else a fresh one.
    ``nsplit``: key ranges for full heads (default: by the GPU's size); ``block_n``: keys per
    block; ``num_warps``: warps per program (tuning knobs, see ``benchmarks/tune_kernels.py``).
    States are updated in place. Returns ``out``.
    """
    layout = validate_decode_inputs(t, head_kinds, head_params, head_windows)
    bsz, hq, _, d = t.q.shape
    dv = t.v_new.shape[-1]
    if not decode_supported(t, head_kinds):
        raise ValueError(
            f"hybrid_decode_triton takes the kinds in DECODE_KINDS, head dims up to 128, q and caches of one dtype (fp32/fp16/bf16), "
            f"fp32 states and int32 offsets; got D={d}, Dv={dv}, q {t.q.dtype}"
        )
    if out is None:
        out = t.q.new_empty(bsz, hq, 1, dv)
    elif tuple(out.shape) != (bsz, hq, 1, dv):
        raise ValueError(f"out must have shape {[bsz, hq, 1, dv]}, got {list(out.shape)}")
    with on_device(t.q):
        _launch(layout, t, head_kinds, scale, head_params, head_windows, out, nsplit, block_n, num_warps)
    return out


def _strides(x: Tensor, n: int, present: bool) -> tuple[int, ...]:
    """``x``'s strides, or ``n`` zeros for an absent tensor (the kernel never reads it)."""
    return tuple(x.stride()) if present else (0,) * n


def _launch(
    layout: DecodeLayout,
    t: DecodeTensors,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
    out: Tensor,
    nsplit: int | None,
    block_n: int | None,
    num_warps: int,
) -> None:
    q = t.q
    bsz, hq, _, d = q.shape
    dv = t.v_new.shape[-1]
    kinds = tuple(int(c) for c in head_kinds)
    block_n = block_n or (32 if interpreting() else 64)
    n_full = len(layout.cached_kv)
    tk = t.keys.shape[2] if n_full and t.keys is not None else 0
    ns, per = _split(tk, bsz * n_full, block_n, q.device, nsplit) if n_full else (1, block_n)
    n_items, items_t, heads_t, block_h, n_groups = _device_plan(layout, kinds, bsz, ns, str(q.device))
    if not n_items:
        return
    windows = tuple(int(w) for w in head_windows) or (0,) * (2 * hq)
    win_t = _table(windows, q.device)
    split = ns > 1
    bdv = dot_block(dv)
    part = (
        torch.empty(bsz * n_groups * ns * block_h, bdv + 2, dtype=torch.float32, device=q.device)
        if split else out
    )
    dummy = q
    state_of = split_states(layout, t.states)
    states, states_st = [], []
    for code in (ELU.code, HEDGEHOG.code, GDN.code):  # the kernel's order
        parts = state_of.get(code, ())
        s_, z_ = (parts + parts)[:2] if parts else (dummy, dummy)  # gdn: (S, S), z unused
        states.append((s_, z_))
        states_st.append((_strides(s_, 4, bool(parts)), _strides(z_, 3, len(parts) == 2)))
    fusion = len(head_params) > 0
    params = tuple(head_params) if fusion else (dummy,) * 5
    params_st = tuple(_strides(p, n, fusion) for p, n in zip(params, (1, 3, 2, 3, 2), strict=True))
    stream = bool(layout.stream_kv)
    kk = t.keys if n_full and t.keys is not None else dummy
    vv = t.values if n_full and t.values is not None else dummy
    wk = t.window_keys if stream and t.window_keys is not None else dummy
    wv = t.window_values if stream and t.window_values is not None else dummy
    # the kernel reads window positions with unit stride
    wpos = t.window_pos.contiguous() if stream and t.window_pos is not None else win_t
    tw = wk.shape[2] if stream else 0
    io = tuple(x[:, :, 0] for x in (q, t.k_new, t.v_new, out))
    cache_st = (_strides(kk, 4, n_full > 0), _strides(vv, 4, n_full > 0), _strides(wk, 4, stream), _strides(wv, 4, stream))
    _decode_kernel[(n_items,)](
        io, tuple(x.stride() for x in io), (kk, vv, wk, wv, wpos), cache_st,
        tuple(states), tuple(states_st), params, params_st,
        items_t, heads_t, win_t, part,
        tk, tw, d, dv, hq // t.k_new.shape[1], float(scale) * LOG2E, per, ns, n_groups,
        HAS_FULL=n_full > 0,
        HAS_STREAM=stream,
        HAS_ELU=ELU.code in state_of,
        HAS_HH=HEDGEHOG.code in state_of,
        HAS_GDN=GDN.code in state_of,
        FUSION=fusion,
        SPLIT=split,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=dot_block(d),
        BLOCK_DV=bdv,
        BLOCK_F=32 if dot_block(d) >= 32 else 16,
        LOWP=dot_mode(q.dtype),
        num_warps=num_warps,
    )
    if split:
        o3 = io[3]
        _decode_combine[(bsz * n_groups,)](
            o3, part, heads_t, *o3.stride(), dv, ns, n_groups, BLOCK_H=block_h, BLOCK_DV=bdv, num_warps=4,
        )
