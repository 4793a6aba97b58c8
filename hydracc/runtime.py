"""Run a converted checkpoint: transformers' model class with hydracc's hybrid attention.

Design decisions:
- The converted model is the original transformers class; only its attention function
  changes. ``hybrid_attention_forward`` is registered with transformers'
  ``AttentionInterface`` as ``"hydracc"`` and calls ``torch.ops.hydracc.hybrid_attention``,
  the same op the rewritten graph calls, with the head kinds of the layer taken from the
  config's ``hydra`` section (``module.layer_idx``).
- The op is causal by construction; transformers' mask argument is not used. Padded
  batches are not supported yet (the mask is ignored), and decoding with transformers'
  own cache recomputes linear heads from the cached keys (correct, not yet fast).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hydracc.kernels  # noqa: F401  (registers hydracc::hybrid_attention)
from hydracc.converted import read_hydra_section
from hydracc.errors import CheckpointError

ATTN_IMPLEMENTATION = "hydracc"


def hybrid_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``[B, Hq, T, D]``, unexpanded k/v ``[B, Hkv, S, D]``."""
    codes = getattr(module, "_hydracc_kinds", None)
    if codes is None:
        layers = read_hydra_section(module.config.to_dict(), "model config")
        layer = getattr(module, "layer_idx", None)
        if layer not in layers:
            raise CheckpointError(f"attention module for layer {layer} has no entry in the hydra section")
        codes = layers[layer]
        module._hydracc_kinds = codes
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = torch.ops.hydracc.hybrid_attention(query, key, value, codes, float(scale), [])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers
        pass


_register()


def load(path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a converted checkpoint folder; the returned model's forward runs the hybrid.

    ``dtype`` defaults to the dtype the weights are stored in.
    """
    from transformers import AutoModelForCausalLM

    root = Path(path)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{root} has no config.json", hint="pass the folder written by `hydracc convert -o`")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    read_hydra_section(config, str(root))
    model = AutoModelForCausalLM.from_pretrained(
        root,
        attn_implementation=ATTN_IMPLEMENTATION,
        dtype=dtype if dtype is not None else "auto",
        trust_remote_code=False,
        local_files_only=True,
    )
    return model.to(device).eval()
