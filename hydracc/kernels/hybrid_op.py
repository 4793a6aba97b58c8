"""The ``hydracc::hybrid_attention`` custom op: the one call a converted layer makes.

Design: one op for every head kind, registered with ``torch.library.custom_op`` and
an explicit schema, so captured graphs (torch.export) keep it as a single opaque node
``torch.ops.hydracc.hybrid_attention.default``. Arguments are appended, never moved:
``head_windows`` (streaming heads' ``[sink, window]`` per query head) comes after
``head_params`` so the first six positions keep their meaning in saved graphs. The
default implementation is ``composed`` (SDPA for full heads, torch linear attention for the
others; tested against the plain-torch reference). On CUDA, where triton is installed, the
fused Triton prefill (``triton_prefill``, imported on first use) runs instead, registered with
``hybrid_attention_op.register_kernel("cuda")`` so callers and exported graphs do not change.
The fake (meta) implementation validates shapes only and returns a fresh ``[B, Hq, Tq, Dv]``
tensor with the strides the real implementation for that device returns. The decode op
(one new token over the hybrid cache's tensors) is ``decode_op.py``. Autograd: the backward recomputes the reference under autograd from the saved
inputs (no activations kept), so gradients flow through the op to q, k, v and every
head_params tensor (fusion scales, hedgehog and gdn weights); a device kernel will bring
its own backward when it needs one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hydracc.kernels.composed import hybrid_attention_composed
from hydracc.kernels.kinds import ELU, HEDGEHOG
from hydracc.kernels.layout import validate_hybrid_inputs
from hydracc.kernels.naive import hybrid_attention_reference

OP_NAME = "hydracc::hybrid_attention"
OP_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, int[] head_kinds, float scale, Tensor[] head_params,"
    " int[] head_windows) -> Tensor"
)


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=OP_SCHEMA)
def hybrid_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
) -> Tensor:
    # Both implementations build a new output tensor, so the result never aliases an input.
    return hybrid_attention_composed(q, k, v, head_kinds, scale, head_params, head_windows)


@hybrid_attention_op.register_fake
def _hybrid_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
) -> Tensor:
    validate_hybrid_inputs(q, k, v, head_kinds, head_params, head_windows)
    b, hq, tq, _ = q.shape
    if _cuda_uses_triton(q, k, v, head_kinds):  # the Triton prefill's strides: a [B, Tq, Hq, Dv] buffer, transposed
        return q.new_empty(b, tq, hq, v.shape[-1]).transpose(1, 2)
    return q.new_empty(b, hq, tq, v.shape[-1])


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    q, k, v, head_kinds, scale, head_params, head_windows = inputs
    ctx.save_for_backward(q, k, v, *head_params)
    ctx.head_kinds, ctx.scale, ctx.head_windows = list(head_kinds), scale, list(head_windows)


def _backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:
    """Recompute the reference under autograd and differentiate it (only inputs saved)."""
    need_q, need_k, need_v, _, _, need_params, _ = ctx.needs_input_grad
    needs = [need_q, need_k, need_v, *need_params]
    tensors = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]
    q, k, v, *params = tensors
    with torch.enable_grad():
        out = hybrid_attention_reference(q, k, v, ctx.head_kinds, ctx.scale, params, ctx.head_windows)
    wrt = [t for t in tensors if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    dq, dk, dv, *dparams = (next(grads) if t.requires_grad else None for t in tensors)
    # torch.library flattens an *empty* list argument like a tensor list, so its "gradient"
    # must then be an empty list too; a non-empty int[] is one leaf, with gradient None.
    return dq, dk, dv, None, None, dparams, ([] if not ctx.head_windows else None)


hybrid_attention_op.register_autograd(_backward, setup_context=_setup_context)


def hybrid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor] = (),
    head_windows: Sequence[int] = (),
) -> Tensor:
    """Run ``torch.ops.hydracc.hybrid_attention``; see :func:`hybrid_attention_reference`.

    q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, v ``[B, Hkv, Tk, Dv]`` (unexpanded GQA);
    returns ``[B, Hq, Tq, Dv]`` in ``q.dtype``.
    """
    return torch.ops.hydracc.hybrid_attention(
        q,
        k,
        v,
        [int(c) for c in head_kinds],
        float(scale),
        list(head_params),
        [int(w) for w in head_windows],
    )


# === the CUDA implementation ===============================================================
# The fused Triton prefill; triton is imported on the first CUDA call only, so this module
# never needs it. The fake above uses ``_cuda_uses_triton`` for its strides.


def _cuda_uses_triton(q: Tensor, k: Tensor, v: Tensor, head_kinds: Sequence[int]) -> bool:
    """Whether the CUDA implementation runs the Triton prefill (and returns its output layout):
    bf16/fp16 CUDA inputs the kernel takes (dtype, head dims: static properties, so the fake can
    ask under symbolic shapes) in a layer with an elu or hedgehog head. Other layers keep SDPA, so all-full
    layers stay bit-identical to the original model."""
    return triton_prefill_takes(q, k, v, head_kinds, {"cuda"}, {torch.bfloat16, torch.float16})


def triton_prefill_takes(
    q: Tensor, k: Tensor, v: Tensor, head_kinds: Sequence[int], devices: set[str], dtypes: set[torch.dtype]
) -> bool:
    """Whether the fused Triton prefill runs a layer on ``devices`` in ``dtypes`` (fp32 dots have
    no tensor cores: SDPA + torch is faster there): it needs an elu or hedgehog head, only kinds
    in ``triton_prefill.PREFILL_KINDS``, triton importable and inputs
    ``triton_prefill.prefill_supported`` takes. Shared by this op and the
    hybrid cache's first chunk."""
    if q.device.type not in devices or q.dtype not in dtypes or not any(c in (ELU.code, HEDGEHOG.code) for c in head_kinds):
        return False
    try:
        from hydracc.kernels import triton_prefill
    except ImportError:  # no triton on this machine: the composed implementation
        return False
    return all(int(c) in triton_prefill.PREFILL_KINDS for c in head_kinds) and triton_prefill.prefill_supported(q, k, v)


@hybrid_attention_op.register_kernel("cuda")
def _hybrid_attention_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_kinds: Sequence[int],
    scale: float,
    head_params: Sequence[Tensor],
    head_windows: Sequence[int],
) -> Tensor:
    if not _cuda_uses_triton(q, k, v, head_kinds):
        return hybrid_attention_composed(q, k, v, head_kinds, scale, head_params, head_windows)
    from hydracc.kernels.triton_prefill import hybrid_prefill, prefill_fits

    b, hq, tq, _ = q.shape
    out = q.new_empty(b, tq, hq, v.shape[-1]).transpose(1, 2)  # the layout the fake promises
    if not prefill_fits(q, k, v):  # offsets past int32: the composed op, same output layout
        return hybrid_attention_composed(q, k, v, head_kinds, scale, head_params, head_windows, out=out)
    return hybrid_prefill(q, k, v, head_kinds, scale, head_params, head_windows, out=out)
