"""Pieces shared by hydracc's Triton kernels (``triton_prefill``, ``triton_decode``).

Design decisions:
- This module imports triton at the top; only the Triton kernel modules import it, and they
  are imported lazily (the CUDA implementations registered in ``hybrid_op``, tests,
  benchmarks), so ``import hydracc.kernels`` never needs triton.
- Inputs are loaded in their own dtype and converted to fp32 at once; everything is computed
  in fp32 (softmax statistics, feature maps, states, denominators, fusion). Only ``tl.dot``
  operands are cast back to the input dtype when ``LOWP`` (bf16/fp16 inputs on a GPU: tensor
  cores, fp32 accumulation). ``dot_mode`` decides it on the host: under ``TRITON_INTERPRET=1``
  bf16 dots are computed wrongly (silently), so there bf16 inputs take the fp32 path; fp16
  keeps the low-precision path, which tests exercise that way. fp32 inputs use IEEE fp32 dots.
- No ``tl.make_block_ptr`` (gone in triton 3.9) and no multi-config ``@triton.autotune`` (it
  fails under the interpreter): pointers come from strides, block sizes are chosen on the host.
- Every ``tl.dot`` dimension is >= 16 (GPUs reject smaller tiles; the interpreter does not).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

EPS = tl.constexpr(1e-6)  # as ``reference.EPS`` (linear denominator, L2 norm, fusion RMS)
LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # smallest tl.dot dimension a GPU accepts
MAX_HEAD_DIM = 128  # larger heads fall back to the torch paths (D = 256 tiles overflow sm_90 shared memory)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_block(n: int) -> int:
    """A power-of-two block >= 16 covering ``n`` (head dims, value dims)."""
    return max(MIN_BLOCK, triton.next_power_of_2(int(n)))


def dot_mode(dtype: torch.dtype) -> bool:
    """``LOWP``: cast ``tl.dot`` operands to the input dtype (bf16/fp16; fp32 accumulation)."""
    if dtype == torch.float16:
        return True
    return dtype == torch.bfloat16 and not interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small stand-in under the interpreter)."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(maxsize=16)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (Triton launches on the current device), a no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def fits_int32(*tensors: torch.Tensor | None) -> bool:
    """Whether every element of these tensors is addressed with int32 offsets (strides included)."""
    return all(
        t is None or sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0) < 2**31
        for t in tensors
    )


def supported_head_dims(d: int, dv: int) -> bool:
    """Whether the kernels take heads of these dims (registers bound the largest)."""
    return 0 < d <= MAX_HEAD_DIM and 0 < dv <= MAX_HEAD_DIM


@triton.jit
def mm(a, b, LOWP: tl.constexpr, DT: tl.constexpr):
    """``a @ b`` with fp32 accumulation; operands in ``DT`` when ``LOWP``, else IEEE fp32."""
    if LOWP:
        return tl.dot(a.to(DT), b.to(DT))
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def elu_phi(x):
    """The ``elu`` feature map, elu(x) + 1, on fp32."""
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def softmax_rows(x, col_ok):
    """Row softmax of fp32 ``x`` [R, C] over the columns where ``col_ok`` [C]; 0 elsewhere."""
    xm = tl.where(col_ok[None, :], x, float("-inf"))
    m = tl.max(xm, axis=1)
    e = tl.where(col_ok[None, :], tl.exp(xm - m[:, None]), 0.0)
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def softplus(x):
    """log(1 + exp(x)), stable, fp32."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
