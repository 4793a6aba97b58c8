"""Plain-torch reference implementations of every head kind and of the hybrid layer.

Design: these are the definitions the Triton kernels are tested against, so they
favour readability over speed. Shapes are ``[B, H, T, D]`` (heads before time, as
SDPA takes them); inputs may be strided views. Everything is computed in float32 and
cast back to ``q.dtype`` once at the end. When ``Tq < Tk`` the queries are the *last*
``Tq`` positions (causal mask aligned bottom-right), as in prefill-with-cache and decode.
``validate_hybrid_inputs`` looks at shapes only, so it also runs on fake/meta tensors.
All functions are differentiable with ordinary torch autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from hydracc.kernels.head_kinds import ELU, FULL, KIND_NAMES, kind_by_code


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Same-head-count checks for the per-kind functions below."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape [B, H, T, D], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must agree on batch and heads (and k, v on length), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} != {k.shape[-1]}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"more queries than keys: Tq={q.shape[2]} > Tk={k.shape[2]}")


def _causal_mask(tq: int, tk: int, device: torch.device) -> Tensor:
    """``[Tq, Tk]`` bool, True where query i (at position Tk - Tq + i) may see key j."""
    return torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)


def causal_softmax_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal softmax attention.

    q: ``[B, H, Tq, D]``, k: ``[B, H, Tk, D]``, v: ``[B, H, Tk, Dv]``, ``Tq <= Tk``
    (caller expands GQA heads). Returns ``[B, H, Tq, Dv]`` in ``q.dtype``.
    """
    _check_qkv(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    scores = scores.masked_fill(~_causal_mask(tq, tk, q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1, positive everywhere (the ``elu`` head kind's feature map)."""
    return F.elu(x) + 1.0


def causal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6
) -> Tensor:
    """Normalized causal linear attention, parallel (quadratic, masked) form.

    ``out_t = phi(q_t) . S_t / (phi(q_t) . z_t + eps)`` with
    ``S_t = sum_{s<=t} phi(k_s) v_s^T`` and ``z_t = sum_{s<=t} phi(k_s)``.
    Shapes as in :func:`causal_softmax_attention` (query i sits at position Tk - Tq + i).
    """
    _check_qkv(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    fq, fk = elu_feature_map(q.float()), elu_feature_map(k.float())
    weights = fq @ fk.transpose(-1, -2)  # [B, H, Tq, Tk], all >= 0
    weights = weights.masked_fill(~_causal_mask(tq, tk, q.device), 0.0)
    numer = weights @ v.float()  # phi(q_t) . S_t
    denom = weights.sum(dim=-1, keepdim=True) + eps  # phi(q_t) . z_t + eps
    return (numer / denom).to(q.dtype)


def causal_linear_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, eps: float = 1e-6
) -> Tensor:
    """The same as :func:`causal_linear_attention`, one key at a time with explicit state.

    State per head: ``S`` ``[D, Dv]`` and ``z`` ``[D]``. This is the readable definition
    (and what decode does); it is slow, use it for tests.
    """
    _check_qkv(q, k, v)
    b, h, tq, d = q.shape
    tk, dv = k.shape[2], v.shape[-1]
    fq, fk, vf = elu_feature_map(q.float()), elu_feature_map(k.float()), v.float()
    state = q.new_zeros(b, h, d, dv, dtype=torch.float32)  # S_t
    norm = q.new_zeros(b, h, d, dtype=torch.float32)  # z_t
    outs = []
    for s in range(tk):
        state = state + fk[:, :, s, :, None] * vf[:, :, s, None, :]
        norm = norm + fk[:, :, s]
        i = s - (tk - tq)  # index of the query at position s, if any
        if i >= 0:
            numer = torch.einsum("bhd,bhde->bhe", fq[:, :, i], state)
            denom = (fq[:, :, i] * norm).sum(dim=-1, keepdim=True) + eps
            outs.append(numer / denom)
    if not outs:
        return q.new_empty(b, h, 0, dv)
    return torch.stack(outs, dim=2).to(q.dtype)


def validate_hybrid_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    head_params: Sequence[Tensor] = (),
) -> None:
    """Check the arguments of the hybrid layer; shapes only, so fake/meta tensors work.

    Raises ``ValueError`` naming the problem.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "hybrid attention expects q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, hq, tq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length"
        )
    if k.shape[3] != d:
        raise ValueError(f"q and k head dims differ: {d} != {k.shape[3]}")
    hkv, tk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) "
            "for grouped-query attention"
        )
    if tq > tk:
        raise ValueError(f"more queries than keys: Tq={tq} > Tk={tk}")
    if len(head_kinds) != hq:
        raise ValueError(
            f"head_kinds has {len(head_kinds)} entries but q has {hq} heads (one code per query head)"
        )
    for h, code in enumerate(head_kinds):
        try:
            kind_by_code(code)
        except KeyError as err:
            raise ValueError(f"head {h}: {err.args[0]}") from None
    if len(head_params) != 0:
        raise ValueError(
            f"got {len(head_params)} head_params tensors, but none of the head kinds "
            f"({', '.join(KIND_NAMES)}) takes parameters"
        )
    if not (
        q.dtype.is_floating_point
        and k.dtype.is_floating_point
        and v.dtype.is_floating_point
    ):
        raise ValueError(
            f"q, k, v must be floating point, got {q.dtype}, {k.dtype}, {v.dtype}"
        )


# head kind code -> reference for a group of heads (q, k, v already per query head, fp32).
_RUN_KIND: dict[int, Callable[[Tensor, Tensor, Tensor, float], Tensor]] = {
    FULL.code: causal_softmax_attention,
    ELU.code: lambda q, k, v, scale: causal_linear_attention(q, k, v),
}


def heads_by_kind(head_kinds: Sequence[int], group: int, device: torch.device) -> Iterator[tuple[int, Tensor, Tensor]]:
    """For each kind present: ``(code, query head indices, their KV head indices)``."""
    for code in sorted(set(head_kinds)):
        q_idx = torch.tensor([h for h, c in enumerate(head_kinds) if c == code], device=device)
        yield code, q_idx, q_idx // group


def hybrid_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
) -> Tensor:
    """A head-level hybrid attention layer: each query head runs its own kind.

    q: ``[B, Hq, Tq, D]``; k: ``[B, Hkv, Tk, D]``, v: ``[B, Hkv, Tk, Dv]`` *unexpanded*
    (query head h reads kv head ``h // (Hq // Hkv)``); ``head_kinds[h]`` is a code from
    :mod:`hydracc.kernels.head_kinds`. ``scale`` applies to full heads only.
    ``head_params`` is reserved for learned kinds; none exist yet, so it must be empty.
    Returns ``[B, Hq, Tq, Dv]`` in ``q.dtype``.
    """
    validate_hybrid_inputs(q, k, v, head_kinds, head_params)
    b, hq, tq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    group = hq // hkv
    q32, k32, v32 = q.float(), k.float(), v.float()
    out = q32.new_zeros(b, hq, tq, dv)
    for code, q_idx, kv_idx in heads_by_kind(head_kinds, group, q.device):
        run_heads = _RUN_KIND[code]
        res = run_heads(
            q32.index_select(1, q_idx),
            k32.index_select(1, kv_idx),
            v32.index_select(1, kv_idx),
            scale,
        )
        out = out.index_copy(1, q_idx, res)
    return out.to(q.dtype)


def run_kind(code: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The reference for heads of one kind, ``code``; q, k, v per query head (GQA expanded)."""
    try:
        run_heads = _RUN_KIND[code]
    except KeyError:
        raise ValueError(f"unknown head kind code {code!r}") from None
    return run_heads(q, k, v, scale)


def causal_linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, norm: Tensor | None, eps: float = 1e-6
) -> tuple[Tensor, Tensor, Tensor]:
    """Linear attention over a chunk of new tokens that continues from a saved state.

    q, k: ``[B, H, T, D]``, v: ``[B, H, T, Dv]`` (the chunk: prefill or one decode token);
    ``state`` ``[B, H, D, Dv]`` and ``norm`` ``[B, H, D]`` sum ``phi(k) v^T`` and ``phi(k)`` over
    all earlier tokens (fp32; ``None`` for none). Returns ``(out, state', norm')`` with the
    chunk included: ``out_t = phi(q_t) . (S0 + sum_{s<=t} phi(k_s) v_s^T) / (phi(q_t) . (z0 +
    sum_{s<=t} phi(k_s)) + eps)``, equal to :func:`causal_linear_attention` over the whole
    sequence. ``out`` is in ``q.dtype``.
    """
    _check_qkv(q, k, v)
    b, h, t, d = q.shape
    dv = v.shape[-1]
    fq, fk, vf = elu_feature_map(q.float()), elu_feature_map(k.float()), v.float()
    if state is None:
        state = fq.new_zeros(b, h, d, dv)
        norm = fq.new_zeros(b, h, d)
    assert norm is not None
    weights = (fq @ fk.transpose(-1, -2)).masked_fill(~_causal_mask(t, t, q.device), 0.0)  # [B, H, T, T]
    numer = fq @ state + weights @ vf
    denom = (fq * norm[:, :, None, :]).sum(-1, keepdim=True) + weights.sum(-1, keepdim=True) + eps
    new_state = state + fk.transpose(-1, -2) @ vf
    new_norm = norm + fk.sum(dim=2)
    return (numer / denom).to(q.dtype), new_state, new_norm
