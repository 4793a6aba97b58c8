"""The ``hedgehog`` kind (code 2): normalized causal linear attention with a learned feature map
``phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))]`` (Hedgehog / LoLCATs).

Parameters: ``hedgehog_weight [Hq, D, D]``, ``hedgehog_bias [Hq, D]``; starting values
``W ~ N(0, scale)``, ``b = 0``. Decode state per head: ``S [2D, Dv]``, ``z [2D]`` (fp32): the
feature dim is ``2 * D``, stated here only (:func:`state_shapes`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from hydracc.kernels.kinds.base import (
    EPS,
    HeadKind,
    Shape,
    check_qkv,
    linear_parallel,
    linear_recurrent,
    linear_step,
    param,
)

PARAMS = ("hedgehog_weight", "hedgehog_bias")


def feature_dim(d: int) -> int:
    """The feature (state row) count of a head of dim ``d``: two softmaxes of ``d`` each."""
    return 2 * d


def hedgehog_feature_map(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The ``hedgehog`` kind's learned feature map, ``[B, H, T, D] -> [B, H, T, 2D]``.

    ``phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))]`` with ``weight`` ``[H, D, D]``
    and ``bias`` ``[H, D]`` (one row per head of ``x``). Computed in float32.
    """
    proj = torch.einsum("bhtd,hde->bhte", x.float(), weight.float()) + bias.float()[:, None, :]
    return torch.cat([proj.softmax(dim=-1), (-proj).softmax(dim=-1)], dim=-1)


def hedgehog_attention(q: Tensor, k: Tensor, v: Tensor, weight: Tensor, bias: Tensor, eps: float = EPS) -> Tensor:
    """Normalized causal linear attention with the hedgehog feature map (parallel form).

    As ``elu.causal_linear_attention`` with ``phi = hedgehog_feature_map(., weight, bias)``
    (state dim 2D); ``weight`` ``[H, D, D]``, ``bias`` ``[H, D]``.
    """
    check_qkv(q, k, v)
    fq, fk = hedgehog_feature_map(q, weight, bias), hedgehog_feature_map(k, weight, bias)
    return linear_parallel(fq, fk, v.float(), eps).to(q.dtype)


def hedgehog_attention_recurrent(
    q: Tensor, k: Tensor, v: Tensor, weight: Tensor, bias: Tensor, eps: float = EPS
) -> Tensor:
    """:func:`hedgehog_attention`, one key at a time with explicit state (slow; for tests)."""
    check_qkv(q, k, v)
    fq, fk = hedgehog_feature_map(q, weight, bias), hedgehog_feature_map(k, weight, bias)
    return linear_recurrent(fq, fk, v.float(), eps).to(q.dtype)


def _weights(params: Mapping[str, Tensor] | None) -> tuple[Tensor, Tensor]:
    return param(params, "hedgehog_weight", "hedgehog"), param(params, "hedgehog_bias", "hedgehog")


def forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, params: Mapping[str, Tensor] | None = None, sink: int = 0, window: int = 0
) -> Tensor:
    return hedgehog_attention(q, k, v, *_weights(params))


def step(
    q: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, ...] | None, params: Mapping[str, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, ...]]:
    weight, bias = _weights(params)
    fq, fk = hedgehog_feature_map(q, weight, bias), hedgehog_feature_map(k, weight, bias)
    out, new = linear_step(fq, fk, v.float(), state, EPS)
    return out.to(q.dtype), new


def state_shapes(b: int, h: int, d: int, dv: int) -> tuple[Shape, ...]:
    f = feature_dim(d)
    return (b, h, f, dv), (b, h, f)


def param_shapes(h: int, d: int) -> dict[str, Shape]:
    return {"hedgehog_weight": (h, d, d), "hedgehog_bias": (h, d)}


def init_params(
    rows: dict[str, Tensor], h: int, d: int, *, scale: float, distance: float, generator: torch.Generator
) -> None:
    """A random projection of variance ``scale`` (the softmax scale), zero bias."""
    rows["hedgehog_weight"][h] = torch.randn(d, d, generator=generator) * math.sqrt(scale)


HEDGEHOG = HeadKind(
    "hedgehog",
    2,
    linear=True,
    keeps_kv=False,
    description="normalized causal linear attention with a learned feature map "
    "[softmax(xW + b), softmax(-(xW + b))] (Hedgehog / LoLCATs)",
    learned=True,
    forward=forward,
    step=step,
    state_parts=("state", "norm"),
    state_shapes=state_shapes,
    params=PARAMS,
    param_shapes=param_shapes,
    init_params=init_params,
    symbol="h",
)
