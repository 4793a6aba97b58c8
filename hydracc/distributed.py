"""Several processes through torch.distributed (torchrun): which rows are mine, sums across ranks.

Design decisions:
- ``torchrun --nproc-per-node N -m hydracc convert ...`` starts N processes; ``init`` joins them
  (NCCL on CUDA, gloo on the CPU) from the environment torchrun sets. Without ``WORLD_SIZE`` (or
  with 1) everything here is a no-op, so one process needs no launcher.
- Work is split by calibration rows (``my_rows``: row ``i`` belongs to rank ``i % world``), not by
  units: every rank then holds only its rows' activations, and what the ranks computed is added
  up with ``all_reduce`` (float64 sums for scores; gradients of the added parameters, which are
  small). Every rank ends with the same numbers, so every rank makes the same plan; rank 0 alone
  writes files.
- Each process computes on ``cuda:LOCAL_RANK`` when CUDA is available, else on the CPU.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import numpy as np


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init() -> bool:
    """Join the process group torchrun described in the environment; ``False`` when there is none."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_available() and dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(_finish)
    return True


def _finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def env_is_main() -> bool:
    """Whether this process is rank 0, read from torchrun's environment (no torch import)."""
    return os.environ.get("RANK", "0") == "0"


def local_device() -> Any:
    """This process's device: ``cuda:LOCAL_RANK`` under torchrun with CUDA, else CUDA/CPU as usual."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def my_rows(n: int) -> list[int]:
    """The calibration rows this rank works on (all of them in one process)."""
    return list(range(rank(), n, world_size()))


def gather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Per-row values of this rank's rows (``my_rows(n)``, along axis 0) placed among all ``n`` rows."""
    if world_size() == 1:
        return np.asarray(local, dtype=np.float64)
    full = np.zeros((n, *np.shape(local)[1:]), dtype=np.float64)
    full[my_rows(n)] = local
    return sum_arrays({"rows": full})["rows"]


def sum_arrays(arrays: dict[Any, np.ndarray]) -> dict[Any, np.ndarray]:
    """``arrays`` added up over the ranks (float64), in a fixed key order."""
    if world_size() == 1:
        return arrays
    import torch
    import torch.distributed as dist

    keys = sorted(arrays, key=repr)
    flat = torch.from_numpy(np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys]))
    dist.all_reduce(flat)
    out: dict[Any, np.ndarray] = {}
    at = 0
    for k in keys:
        size = np.asarray(arrays[k]).size
        out[k] = flat[at : at + size].numpy().reshape(np.asarray(arrays[k]).shape)
        at += size
    return out


def sum_tensors(tensors: list[Any]) -> None:
    """Add ``tensors`` (gradients) up over the ranks, in place."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        if t is not None:
            dist.all_reduce(t)


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
