"""Fused Triton decode step for ``hydracc::hybrid_decode``: one new token, a whole layer.

Design decisions:
- One launch, one program per work item, most expensive first: softmax items (a batch row and
  a cached KV head, with *all* full query heads reading it as the rows of one tile, so each key
  is loaded once per KV head as in SDPA's ``enable_gqa``; a key range when split), streaming
  items (the same over the window cache, masked by absolute positions per row), and linear
  items (a batch row and a linear head: elu, hedgehog and gdn are all fused here).
- Flash-decoding split: when batch x cached KV heads gives fewer programs than about two per SM,
  the keys of full heads are split into ranges; each range writes fp32 partials (max, sum,
  accumulator) and a second small launch combines them. Without a split it is one launch.
- Linear heads update their fp32 state in place, ``BLOCK_F`` state rows at a time (the whole
  state never sits in registers): elu/hedgehog ``S += phi(k) v^T``, ``z += phi(k)`` and
  ``out = phi(q) S / (phi(q) z + eps)``; gdn reads ``k^T S`` in a first pass, then
  ``S = a (S - b k (k^T S)) + b k v^T`` and ``out = S^T q`` in a second. Hedgehog's feature
  map needs the whole projection for its softmaxes: it is computed once as a vector, and each
  block of rows picks its slice with a masked reduction. Fusion is applied in the program
  (it holds the whole value row).
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

from hydracc.kernels.decode_op import STATE_PART_COUNT, DecodeLayout, validate_decode_inputs
from hydracc.kernels.head_kinds import ELU, FULL, GDN, HEDGEHOG, STREAMING
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


@triton.jit
def _pick(vec, offs, idx):
    """``vec[idx]`` for a block of indices ``idx`` (a register gather: masked reduction)."""
    return tl.sum(tl.where(offs[None, :] == idx[:, None], vec[None, :], 0.0), axis=1)


@triton.jit
def _decode_attend(
    q_ptr, k_base, v_base, pos_ptr, o_ptr, part_ptr, heads, b, lo, hi, p_query, sink_r, win_r,
    part_row, D, Dv, qk_scale, sqb, sqh, sqd, skt, skd, svt, svd, sob, soh, sod,
    HAS_POS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, LOWP: tl.constexpr,
):
    """Softmax of the query rows ``heads`` (-1: padding) over cached keys ``[lo, hi)``."""
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
    q_ptr, kn_ptr, vn_ptr, o_ptr, s_ptr, z_ptr, fs_ptr, hw_ptr, hb_ptr, gw_ptr, gb_ptr,
    b, h, slot, GROUP, D, Dv,
    sqb, sqh, sqd, sknb, sknh, sknd, svnb, svnh, svnd, sob, soh, sod,
    ssb, ssh, ssf, ssd, szb, szh, szf,
    sfs, shw_h, shw_i, shw_j, shb_h, shb_d, sgw_h, sgw_d, sgw_g, sgb_h, sgb_g,
    KIND: tl.constexpr, FUSION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One linear head ``h`` (state row ``slot`` of its kind): update the state, write the output."""
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
    if KIND == 1:  # elu: phi is elementwise, each block of rows loads its own slice
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
    if KIND == 2:  # hedgehog: projections as vectors, then rows [0, D) positive, [D, 2D) negative
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
    if KIND == 3:  # gdn: gates from the raw key, L2-normalized q and k, two passes over S
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
    q_ptr, kn_ptr, vn_ptr, o_ptr, keys_ptr, vals_ptr, wk_ptr, wv_ptr, wpos_ptr,
    se_ptr, ze_ptr, sh_ptr, zh_ptr, sg_ptr, fs_ptr, hw_ptr, hb_ptr, gw_ptr, gb_ptr,
    items_ptr, gheads_ptr, win_ptr, part_ptr,
    sqb, sqh, sqd, sknb, sknh, sknd, svnb, svnh, svnd, sob, soh, sod,
    skb, skh, skt, skd, svb, svh, svt, svd, swkb, swkh, swkt, swkd, swvb, swvh, swvt, swvd,
    sseb, sseh, ssef, ssed, szeb, szeh, szef, sshb, sshh, sshf, sshd, szhb, szhh, szhf,
    ssgb, ssgh, ssgf, ssgd,
    sfs, shw_h, shw_i, shw_j, shb_h, shb_d, sgw_h, sgw_d, sgw_g, sgb_h, sgb_g,
    T, Tw, D, Dv, GROUP, qk_scale, SPLIT_LEN, NSPLIT, NGROUPS,
    HAS_FULL: tl.constexpr, HAS_STREAM: tl.constexpr, HAS_ELU: tl.constexpr,
    HAS_HH: tl.constexpr, HAS_GDN: tl.constexpr, FUSION: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_F: tl.constexpr, LOWP: tl.constexpr,
):
    """One work item per program: ``[kind, b, x, y, slot]`` (see ``decode_plan``)."""
    it = tl.program_id(0)
    kind = tl.load(items_ptr + ITEM * it)
    b = tl.load(items_ptr + ITEM * it + 1)
    x = tl.load(items_ptr + ITEM * it + 2)
    y = tl.load(items_ptr + ITEM * it + 3)
    slot = tl.load(items_ptr + ITEM * it + 4)
    if HAS_FULL:
        if kind == 0:  # x: head group, y: key range
            heads = tl.load(gheads_ptr + x * BLOCK_H + tl.arange(0, BLOCK_H))
            lo = y * SPLIT_LEN
            hi = tl.minimum(lo + SPLIT_LEN, T)
            _decode_attend(
                q_ptr, keys_ptr + b * skb + slot * skh, vals_ptr + b * svb + slot * svh, wpos_ptr,
                o_ptr, part_ptr, heads, b, lo, hi, 0, heads, heads,
                ((b * NGROUPS + x) * NSPLIT + y) * BLOCK_H, D, Dv, qk_scale,
                sqb, sqh, sqd, skt, skd, svt, svd, sob, soh, sod,
                False, SPLIT, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
    if HAS_STREAM:
        if kind == 4:  # x: head group; rows see j < sink or j > p - window by absolute position
            heads = tl.load(gheads_ptr + x * BLOCK_H + tl.arange(0, BLOCK_H))
            hh = tl.where(heads >= 0, heads, 0)
            sink_r = tl.load(win_ptr + 2 * hh)
            win_r = tl.load(win_ptr + 2 * hh + 1)
            p_query = tl.load(wpos_ptr + Tw - 1)
            _decode_attend(
                q_ptr, wk_ptr + b * swkb + slot * swkh, wv_ptr + b * swvb + slot * swvh, wpos_ptr,
                o_ptr, part_ptr, heads, b, 0, Tw, p_query, sink_r, win_r, 0, D, Dv, qk_scale,
                sqb, sqh, sqd, swkt, swkd, swvt, swvd, sob, soh, sod,
                True, False, BLOCK_H, BLOCK_N, BLOCK_D, BLOCK_DV, LOWP)
    if HAS_ELU:
        if kind == 1:
            _decode_linear(
                q_ptr, kn_ptr, vn_ptr, o_ptr, se_ptr, ze_ptr, fs_ptr, hw_ptr, hb_ptr, gw_ptr, gb_ptr,
                b, x, slot, GROUP, D, Dv,
                sqb, sqh, sqd, sknb, sknh, sknd, svnb, svnh, svnd, sob, soh, sod,
                sseb, sseh, ssef, ssed, szeb, szeh, szef,
                sfs, shw_h, shw_i, shw_j, shb_h, shb_d, sgw_h, sgw_d, sgw_g, sgb_h, sgb_g,
                1, FUSION, BLOCK_D, BLOCK_DV, BLOCK_F)
    if HAS_HH:
        if kind == 2:
            _decode_linear(
                q_ptr, kn_ptr, vn_ptr, o_ptr, sh_ptr, zh_ptr, fs_ptr, hw_ptr, hb_ptr, gw_ptr, gb_ptr,
                b, x, slot, GROUP, D, Dv,
                sqb, sqh, sqd, sknb, sknh, sknd, svnb, svnh, svnd, sob, soh, sod,
                sshb, sshh, sshf, sshd, szhb, szhh, szhf,
                sfs, shw_h, shw_i, shw_j, shb_h, shb_d, sgw_h, sgw_d, sgw_g, sgb_h, sgb_g,
                2, FUSION, BLOCK_D, BLOCK_DV, BLOCK_F)
    if HAS_GDN:
        if kind == 3:
            _decode_linear(
                q_ptr, kn_ptr, vn_ptr, o_ptr, sg_ptr, sg_ptr, fs_ptr, hw_ptr, hb_ptr, gw_ptr, gb_ptr,
                b, x, slot, GROUP, D, Dv,
                sqb, sqh, sqd, sknb, sknh, sknd, svnb, svnh, svnd, sob, soh, sod,
                ssgb, ssgh, ssgf, ssgd, 0, 0, 0,
                sfs, shw_h, shw_i, shw_j, shb_h, shb_d, sgw_h, sgw_d, sgw_g, sgb_h, sgb_g,
                3, FUSION, BLOCK_D, BLOCK_DV, BLOCK_F)


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


def decode_supported(
    q: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    keys: Tensor | None,
    values: Tensor | None,
    states: Sequence[Tensor],
    window_keys: Tensor | None = None,
    window_values: Tensor | None = None,
) -> bool:
    """Whether :func:`hybrid_decode_triton` takes these inputs (else the reference runs): head
    dims up to 128, q/keys/values of one dtype among fp32/fp16/bf16, fp32 states, int32 offsets."""
    kv = [t for t in (k_new, v_new, keys, values, window_keys, window_values) if t is not None]
    return (
        supported_head_dims(q.shape[-1], v_new.shape[-1])
        and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and all(t.dtype == q.dtype for t in kv)
        and all(s.dtype == torch.float32 for s in states)
        and fits_int32(q, *kv, *states)
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
    *,
    out: Tensor | None = None,
    nsplit: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """``hybrid_decode`` with the fused Triton kernel (same arguments, see ``decode_op.hybrid_decode``).

    ``out``: a ``[B, Hq, 1, Dv]`` tensor to write (any strides), else a fresh one.
    ``nsplit``: key ranges for full heads (default: by the GPU's size); ``block_n``: keys per
    block; ``num_warps``: warps per program (tuning knobs, see ``benchmarks/tune_kernels.py``).
    States are updated in place. Returns ``out``.
    """
    layout = validate_decode_inputs(
        q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos,
        head_kinds, head_params, head_windows,
    )
    bsz, hq, _, d = q.shape
    dv = v_new.shape[-1]
    if not decode_supported(q, k_new, v_new, keys, values, states, window_keys, window_values):
        raise ValueError(
            f"hybrid_decode_triton takes head dims up to 128, q and caches of one dtype (fp32/fp16/bf16), "
            f"fp32 states and int32 offsets; got D={d}, Dv={dv}, q {q.dtype}"
        )
    if out is None:
        out = q.new_empty(bsz, hq, 1, dv)
    elif tuple(out.shape) != (bsz, hq, 1, dv):
        raise ValueError(f"out must have shape {[bsz, hq, 1, dv]}, got {list(out.shape)}")
    with on_device(q):
        _launch(
            layout, q, k_new, v_new, keys, values, states, window_keys, window_values, window_pos,
            head_kinds, scale, head_params, head_windows, out, nsplit, block_n, num_warps,
        )
    return out


def _launch(
    layout: DecodeLayout,
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
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
    out: Tensor,
    nsplit: int | None,
    block_n: int | None,
    num_warps: int,
) -> None:
    bsz, hq, _, d = q.shape
    dv = v_new.shape[-1]
    kinds = tuple(int(c) for c in head_kinds)
    block_n = block_n or (32 if interpreting() else 64)
    t = keys.shape[2] if layout.cached_kv else 0
    n_full = len(layout.cached_kv)
    ns, per = _split(t, bsz * n_full, block_n, q.device, nsplit) if n_full else (1, block_n)
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
    state_of: dict[int, tuple[Tensor, ...]] = {}
    it = iter(states)
    for code, _ in layout.linear:
        state_of[code] = tuple(next(it) for _ in range(STATE_PART_COUNT[code]))
    se, ze = state_of.get(ELU.code, (dummy, dummy))
    sh, zh = state_of.get(HEDGEHOG.code, (dummy, dummy))
    (sg,) = state_of.get(GDN.code, (dummy,))

    def strides(x: Tensor | None, n: int, present: bool) -> tuple[int, ...]:
        return tuple(x.stride()) if present and x is not None else (0,) * n

    fusion = len(head_params) > 0
    fs, hw, hb, gw, gb = head_params if fusion else (dummy,) * 5
    kk = keys if n_full else dummy
    vv = values if n_full else dummy
    stream = bool(layout.stream_kv)
    wk = window_keys if stream else dummy
    wv = window_values if stream else dummy
    wpos = window_pos.contiguous() if stream else win_t  # the kernel reads positions with unit stride
    tw = window_keys.shape[2] if stream else 0
    q3, kn3, vn3, o3 = (x[:, :, 0] for x in (q, k_new, v_new, out))
    _decode_kernel[(n_items,)](
        q3, kn3, vn3, o3, kk, vv, wk, wv, wpos, se, ze, sh, zh, sg, fs, hw, hb, gw, gb,
        items_t, heads_t, win_t, part,
        *q3.stride(), *kn3.stride(), *vn3.stride(), *o3.stride(),
        *strides(kk, 4, n_full > 0), *strides(vv, 4, n_full > 0), *strides(wk, 4, stream), *strides(wv, 4, stream),
        *strides(se, 4, ELU.code in state_of), *strides(ze, 3, ELU.code in state_of),
        *strides(sh, 4, HEDGEHOG.code in state_of), *strides(zh, 3, HEDGEHOG.code in state_of),
        *strides(sg, 4, GDN.code in state_of),
        *strides(fs, 1, fusion), *strides(hw, 3, fusion), *strides(hb, 2, fusion),
        *strides(gw, 3, fusion), *strides(gb, 2, fusion),
        t, tw, d, dv, hq // k_new.shape[1], float(scale) * LOG2E, per, ns, n_groups,
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
        _decode_combine[(bsz * n_groups,)](
            o3, part, heads_t, *o3.stride(), dv, ns, n_groups, BLOCK_H=block_h, BLOCK_DV=bdv, num_warps=4,
        )
