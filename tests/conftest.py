"""Shared test setup: interpreter mode for Triton, no network, tiny real checkpoints."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import FAMILIES, build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint("llama-gqa", dtype=torch.float32, shard=None) -> Path`` (cached)."""
    cache: dict[tuple, Path] = {}

    def make(name: str = "llama-gqa", dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
        key = (name, dtype, shard)
        if key not in cache:
            family, heads, kv = FAMILIES[name]
            model = build_tiny_model(family, heads, kv).to(dtype)
            out = tmp_path_factory.mktemp(f"{name}-{str(dtype).removeprefix('torch.')}")
            model.save_pretrained(out, max_shard_size=shard or "5GB")
            cache[key] = out
        return cache[key]

    return make
