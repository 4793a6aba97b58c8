"""Helpers shared by the tests: tiny real models, and an independent oracle for hybrid attention."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "examples" / "make_tiny_checkpoint.py")
make_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_tiny)

# name -> (family, query heads, KV heads)
FAMILIES = {
    "llama-gqa": ("llama", 4, 2),
    "mistral-gqa": ("mistral", 4, 2),
    "qwen2-mha": ("qwen2", 4, 4),
    "qwen3-mqa": ("qwen3", 4, 1),
    "gpt2-mha": ("gpt2", 4, 4),
}


def build_tiny_model(family: str, heads: int, kv_heads: int, *, layers: int = 2, hidden: int = 32, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = make_tiny.make_config(family, layers=layers, heads=heads, kv_heads=kv_heads, hidden=hidden, vocab=64)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def load_original(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


ORACLE = "hydracc_test_oracle"


def use_oracle(model, kinds_by_layer: dict[int, list[str]]):
    """Make ``model`` (an original transformers model) compute hybrid attention independently.

    Each query head of layer ``l`` runs ``kinds_by_layer[l][h]``: ``full`` through the
    plain-torch causal softmax, ``elu`` through the plain-torch linear attention, on K/V
    expanded per query head. Nothing from hydracc's op, passes or runtime is used.
    """
    from transformers import AttentionInterface

    from hydracc.kernels.kinds.elu import causal_linear_attention
    from hydracc.kernels.kinds.full import causal_softmax_attention

    def oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        heads = []
        for h, kind in enumerate(kinds_by_layer[module.layer_idx]):
            q, k, v = query[:, h : h + 1], key[:, h : h + 1], value[:, h : h + 1]
            if kind == "full":
                heads.append(causal_softmax_attention(q, k, v, scaling))
            else:
                assert kind == "elu", kind
                heads.append(causal_linear_attention(q, k, v))
        return torch.cat(heads, dim=1).transpose(1, 2).contiguous(), None

    AttentionInterface.register(ORACLE, oracle)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ORACLE, sdpa_mask)
    except ImportError:
        pass
    model.set_attn_implementation(ORACLE)
    return model


def plan_with_kinds(src, tmp_path, kinds_by_layer: list[list[str]], fusion: bool, window: int = 3, sink: int = 1) -> object:
    """A plan file giving each head its own kind (streaming heads with a short window)."""
    import json

    from hydracc.convert import inspect_checkpoint, make_plan

    insp = inspect_checkpoint(src)
    try:
        plan = make_plan(insp, strategy="even")
    finally:
        insp.checkpoint.close()
    doc = plan.to_json()
    doc["fusion"] = fusion
    for layer, kinds in zip(doc["layers"], kinds_by_layer):
        layer["heads"] = [
            {"kind": k, "params": {"sink": sink, "window": window} if k == "streaming" else {}} for k in kinds
        ]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    return path
