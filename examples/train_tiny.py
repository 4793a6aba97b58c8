"""Train the example model: a small byte-level Llama whose heads must do different jobs.

Usage: python examples/train_tiny.py [--out examples/tiny-llama] [--steps N] [--seed 0]

Architecture: transformers' Llama, 4 layers, width 128, 8 query heads / 2 KV heads (head
dim 16), SwiGLU 384, RoPE with theta 1e6, tied embeddings, 256 byte tokens. Trained from
scratch on CPU (about 0.24 s per step on 2 cores).

Data, per step (``hydracc.evaluation.tasks``), one batch of ``--seq-len`` bytes per row mixing
  - text: random windows of the training part of the Python standard library's source
    (held-out files are never seen; see ``hydracc.evaluation.tasks.stdlib_corpus``);
  - MQAR (multi-query associative recall, as in Zoology): 2 to ``max_pairs`` key-value
    pairs from 64 key and 64 value symbols, filler, then every key queried; loss on the
    answers only. ``max_pairs`` ramps from 8 to 16 over the first half of training;
  - passkey: a 5-digit key hidden in filler sentences, asked at the end; loss on the digits;
  - induction: a span of random symbols repeated at a random distance; loss on the repeat.
The losses are summed with fixed weights.

Why the induction rows and the RoPE theta (measured on the 2-core CPU machine, 2026-11-27):
without them every recipe we tried (MQAR-only or mixed, 2 or 4 layers, head dim 16 or 32,
lr 1e-3 to 5e-3, up to 17,750 steps) stopped at the "answer a context value not yet asked"
shortcut: 35% at 8 pairs, which needs no key-value binding. A 2-layer probe with head dim 32,
theta 1e6 and half its rows induction spans left that plateau within 1,000 steps; with head
dim 16 too. A copy task with a *fixed* distance does not help: RoPE solves it by position
alone, without content matching. In the default run the induction loss falls slowly from
step ~1,200 and MQAR jumps from the shortcut (~35% batch accuracy) to ~99% between steps
3,000 and 3,300 (a phase transition, as induction heads are known to show).

Deterministic for a seed on a given machine: data comes from a seeded numpy generator,
weights from ``torch.manual_seed``, and the thread count is fixed (``--threads``).
Writes the checkpoint (safetensors), the byte-level tokenizer, and ``training_log.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hydracc.evaluation.byte_tokenizer import save_byte_tokenizer
from hydracc.evaluation.tasks import (
    IGNORE,
    VOCAB_SIZE,
    induction_example,
    mqar_example,
    passkey_example,
    stack,
    stdlib_corpus,
    text_batch,
)

ROWS = {"text": 12, "mqar": 14, "passkey": 3, "induction": 7}
"""Rows per step for each part of the mixture."""
WEIGHTS = {"text": 1.0, "mqar": 1.0, "passkey": 0.5, "induction": 0.5}


def model_config(width: int = 128, layers: int = 4):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attention_dropout=0.0,
    )


def max_pairs_at(progress: float) -> int:
    return int(round(8 + min(1.0, progress / 0.5) * 8))


def make_batch(step: int, steps: int, args, corpus, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    top = max_pairs_at(step / max(1, steps))
    groups = {
        "text": text_batch(corpus.train, ROWS["text"], args.seq_len, rng),
        "mqar": stack([mqar_example(int(rng.integers(2, top + 1)), args.seq_len, rng) for _ in range(ROWS["mqar"])]),
        "passkey": stack([passkey_example(args.seq_len, rng) for _ in range(ROWS["passkey"])]),
        "induction": stack([induction_example(args.seq_len, rng) for _ in range(ROWS["induction"])]),
    }
    return groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("examples/tiny-llama"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    corpus = stdlib_corpus()
    model = AutoModelForCausalLM.from_config(model_config(args.width), attn_implementation="sdpa")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, min(200, args.steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))

    log: list[dict] = []
    start = time.time()
    model.train()
    for step in range(args.steps):
        groups = make_batch(step, args.steps, args, corpus, rng)
        names = list(groups)
        x = torch.from_numpy(np.concatenate([groups[n][0] for n in names]))
        y = torch.from_numpy(np.concatenate([groups[n][1] for n in names]))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=x).logits
        losses, total, row = {}, torch.zeros(()), 0
        correct = {}
        for n in names:
            rows = len(groups[n][0])
            lg, lb = logits[row : row + rows], y[row : row + rows]
            loss = F.cross_entropy(lg.reshape(-1, VOCAB_SIZE), lb.reshape(-1), ignore_index=IGNORE)
            losses[n] = loss.item()
            total = total + WEIGHTS[n] * loss
            if n == "mqar":
                mask = lb != IGNORE
                correct[n] = ((lg.argmax(-1) == lb) & mask).sum().item() / max(1, mask.sum().item())
            row += rows
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            entry = {"step": step, "seconds": round(time.time() - start, 1), "lr": round(lr_at(step), 6),
                     "max_pairs": max_pairs_at(step / args.steps), **{k: round(v, 4) for k, v in losses.items()},
                     "mqar_batch_accuracy": round(correct["mqar"], 3)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    elapsed = time.time() - start
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    save_byte_tokenizer(args.out)
    meta = {
        "seconds": round(elapsed, 1), "steps": args.steps, "rows": ROWS, "weights": WEIGHTS, "seq_len": args.seq_len,
        "width": args.width, "lr": args.lr, "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "python": sys.version.split()[0], "corpus": corpus.source, "train_files": corpus.train_files,
        "heldout_files": corpus.heldout_files, "train_bytes": int(len(corpus.train)), "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"trained {args.steps} steps in {elapsed / 60:.1f} min -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
