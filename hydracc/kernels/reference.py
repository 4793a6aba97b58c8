"""Deprecated: the plain-torch references moved beside what they define.

Each kind's functions are in :mod:`hydracc.kernels.kinds` (``full``, ``elu``, ``hedgehog``,
``gdn``, ``streaming``), the hybrid layer in :mod:`hydracc.kernels.naive`, input validation in
:mod:`hydracc.kernels.layout`.
"""

from hydracc._moved import forward

__getattr__ = forward(
    __name__,
    "hydracc.kernels.naive",
    "hydracc.kernels.layout",
    "hydracc.kernels.kinds.base",
    "hydracc.kernels.kinds.full",
    "hydracc.kernels.kinds.elu",
    "hydracc.kernels.kinds.hedgehog",
    "hydracc.kernels.kinds.gdn",
    "hydracc.kernels.kinds.streaming",
)
