"""Write a small random-init Hugging Face checkpoint to try hydracc on (no download).

Usage: python examples/make_tiny_checkpoint.py OUT_DIR [--family llama|mistral|qwen2|qwen3|gpt2]
       [--layers 4] [--heads 8] [--kv-heads 2] [--hidden 256] [--dtype float32|bfloat16|float16]
       [--max-shard-size 5GB] [--seed 0]

The model is built from a transformers config and saved with ``save_pretrained``, so it
is a normal checkpoint folder (config.json + safetensors). Its weights are random: use it
to see what conversion does to the structure, not to judge quality.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


def make_config(family: str, *, layers: int, heads: int, kv_heads: int, hidden: int, vocab: int = 256):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(**common, head_dim=hidden // heads)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=2048,
                          bos_token_id=None, eos_token_id=None)
    raise SystemExit(f"unknown family {family!r}; choose llama, mistral, qwen2, qwen3 or gpt2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--family", default="llama")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = make_config(args.family, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, hidden=args.hidden)
    model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    print(f"wrote a random {args.family} checkpoint to {args.out}")


if __name__ == "__main__":
    main()
