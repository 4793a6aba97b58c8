"""Shared inputs for the kernel tests: fresh random q/k/v, head params and windows."""

from __future__ import annotations

import torch

from hydracc.kernels import ELU, FULL, GDN, HEDGEHOG, PARAM_NAMES, STREAMING, param_shapes

ATOL = RTOL = 1e-5
GQA_CASES = [(8, 8), (8, 2), (8, 1)]
GQA_IDS = ["mha", "gqa", "mqa"]

# Eight query heads, all five kinds, two streaming heads with different windows.
FIVE_KINDS = [FULL.code, ELU.code, HEDGEHOG.code, GDN.code, STREAMING.code, HEDGEHOG.code, GDN.code, STREAMING.code]
WINDOWS = [0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 0, 0, 0, 0, 0, 4]  # head 4: sink 2 window 3; head 7: sink 0 window 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def qkv(b: int, hq: int, hkv: int, tq: int, tk: int, d: int = 16, dv: int | None = None, seed: int = 0):
    """Fresh q ``[b, hq, tq, d]``, k ``[b, hkv, tk, d]``, v ``[b, hkv, tk, dv]``."""
    return (
        rand(b, hq, tq, d, seed=seed * 3 + 1),
        rand(b, hkv, tk, d, seed=seed * 3 + 2),
        rand(b, hkv, tk, dv or d, seed=seed * 3 + 3),
    )


def make_params(hq: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    """Random ``head_params`` in ``PARAM_NAMES`` order, scaled like trained values."""
    g = gen(seed + 1000)
    shapes = param_shapes(hq, d)
    scales = {
        "fusion_scale": None,
        "hedgehog_weight": 0.5,
        "hedgehog_bias": 0.1,
        "gdn_gate_weight": 0.3,
        "gdn_gate_bias": 1.0,
    }
    out = []
    for name in PARAM_NAMES:
        if name == "fusion_scale":
            out.append(torch.rand(*shapes[name], generator=g) * 1.5 + 0.5)
        else:
            out.append(torch.randn(*shapes[name], generator=g) * scales[name])
    return out


def param_dict(params: list[torch.Tensor], heads: slice | list[int]) -> dict[str, torch.Tensor]:
    """``PARAM_NAMES`` -> rows ``heads`` (what ``run_kind`` and ``linear_state_step`` take)."""
    return {name: t[heads] for name, t in zip(PARAM_NAMES, params, strict=True)}
