"""Edits to checkpoint tensors decided by graph passes and applied while streaming.

Design decisions:
- Passes run on a graph whose weights are meta tensors; they do not touch weight data.
  Instead they record *what* must happen to a named tensor as data (an index along one
  dim), and the emit stage applies it to each tensor as it streams from the input, so
  memory stays bounded by one tensor.
- The only edit so far is a channel reorder (``index_select``); successive reorders of
  the same tensor and dim compose into one index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class WeightEdits:
    """Channel reorders to apply to named tensors: ``tensor.index_select(dim, index)``."""

    def __init__(self) -> None:
        self._index: dict[tuple[str, int], torch.Tensor] = {}

    def reorder_blocks(self, name: str, dim: int, size: int, offset: int, block: int, order: Sequence[int]) -> None:
        """Reorder ``len(order)`` blocks of ``block`` channels starting at ``offset`` along ``dim``.

        After the edit, block ``j`` holds what block ``order[j]`` held before. Channels
        outside the blocks keep their place. ``size`` is the tensor's length along ``dim``.
        """
        if offset + len(order) * block > size:
            raise ValueError(f"{name}: blocks {offset}..{offset + len(order) * block} exceed dim {dim} of size {size}")
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"{name}: {list(order)} is not a permutation")
        local = torch.arange(size)
        src = torch.tensor(order, dtype=torch.long)[:, None] * block + torch.arange(block)[None, :]
        local[offset : offset + len(order) * block] = offset + src.reshape(-1)
        key = (name, dim)
        previous = self._index.get(key)
        self._index[key] = local if previous is None else previous[local]

    def merge(self, other: WeightEdits) -> None:
        """Apply ``other``'s edits after this one's."""
        for (name, dim), index in other._index.items():
            previous = self._index.get((name, dim))
            self._index[(name, dim)] = index if previous is None else previous[index]

    def names(self) -> set[str]:
        return {name for name, _ in self._index}

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` with every recorded edit for ``name`` applied (unchanged if none)."""
        for (target, dim), index in sorted(self._index.items(), key=lambda kv: kv[0][1]):
            if target == name:
                tensor = tensor.index_select(dim, index.to(tensor.device))
        return tensor

    def __bool__(self) -> bool:
        return bool(self._index)
