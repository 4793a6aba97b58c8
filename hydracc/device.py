"""The default torch device of every command: CUDA when available, else the CPU."""

from __future__ import annotations

from typing import Any


def default_device(device: Any = None) -> Any:
    """``torch.device(device)``, or CUDA when available and the CPU otherwise."""
    import torch

    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
