"""Starting values of the parameters a conversion adds, from two statistics per head.

Design decisions:
- A layer's ``head_params`` start from what the original heads did on calibration data: the
  fusion scale is the head's mean output RMS (a linear head's output is normalized, then brought
  to the original head's size), and each learned kind applies its own rule
  (``HeadKind.init_params``: hedgehog a scaled Gaussian feature map, gdn a decay matched to the
  head's mean attention distance), seeded per (seed, layer, head).
- The analysis uses these values to score units in the kind the plan asks for, and distillation
  starts from them, so what the plan measured is what the conversion starts with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

from hydracc.kernels.kinds import FUSION_PARAM, PARAM_NAMES, kind_by_name, param_shapes


def head_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``(seed, layer, head)``), the same on every machine."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def initial_layer_params(kinds: Sequence[str], head_dim: int, scale: float, rms: Tensor, distance: Tensor, layer: int,
                         seed: int = 0) -> dict[str, Tensor]:
    """The ``PARAM_NAMES`` tensors of a layer whose query head ``h`` is of kind ``kinds[h]``.

    ``rms`` and ``distance``: per query head, the original head's mean output RMS and mean
    attended distance (tokens) on calibration data.
    """
    hq = len(kinds)
    init = {name: torch.zeros(shape) for name, shape in param_shapes(hq, head_dim).items()}
    init[FUSION_PARAM] = rms.float().clamp_min(1e-4)
    for h, name in enumerate(kinds):
        kind = kind_by_name(name)
        if kind.init_params is not None:
            gen = torch.Generator().manual_seed(head_seed(seed, layer, h))
            kind.init_params(init, h, head_dim, scale=scale, distance=float(distance[h]), generator=gen)
    return {name: init[name] for name in PARAM_NAMES}
