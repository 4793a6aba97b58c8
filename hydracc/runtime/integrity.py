"""Tensor digests of a converted checkpoint: written by emit, checked by ``load`` and ``verify``.

Design decisions:
- One sha256 per tensor over its dtype, shape and bytes, recorded in the converted config as
  ``hydra.tensor_sha256`` (name -> hex). Per tensor, not per file, so that emit knows every
  digest before it writes ``config.json`` (the last shard is saved only at close) and a mismatch
  names the tensor that changed.
- Checking reads one tensor at a time (``safe_open``), so memory follows the largest tensor;
  hashing runs at about a gigabyte a second, against the load's own reading of the same bytes.
  ``check_hashes=False`` (``--no-check-hashes``) skips it where that time matters.
- A config without the record (written before it existed) is accepted; one whose record names
  other tensors than the files hold, or a different digest, is a ``CheckpointError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from hydracc.errors import CheckpointError

DIGESTS_KEY = "tensor_sha256"


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 over ``dtype``, ``shape`` and the bytes of ``tensor`` (any device, any layout)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def check_tensor_digests(root: Path, config: dict[str, Any], files: Iterable[Path]) -> None:
    """Compare every tensor in ``files`` with the digests the converted config records; raise on any change."""
    from safetensors import safe_open

    want = (config.get("hydra") or {}).get(DIGESTS_KEY)
    if want is None:
        return
    if not isinstance(want, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in want.items()):
        raise CheckpointError(f"{root}: hydra.{DIGESTS_KEY} in config.json must map tensor names to sha256 digests")
    seen: set[str] = set()
    changed: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                seen.add(name)
                if want.get(name) != tensor_digest(f.get_tensor(name)):
                    changed.append(name)
    missing, extra = sorted(set(want) - seen), sorted(seen - set(want))
    if changed or missing or extra:
        parts = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for what, names in (("changed", sorted(changed)), ("missing", missing), ("not recorded", extra)) if names]
        raise CheckpointError(
            f"{root}: the weights are not the ones hydracc wrote ({'; '.join(parts)})",
            hint="they were edited after conversion: convert again, or pass --no-check-hashes (check_hashes=False) "
                 "to use them as they are",
        )
