"""Train the example model: a small byte-level Llama whose heads must do different jobs.

Usage: python examples/train_tiny.py [--out examples/tiny-llama] [--steps 6000] [--seed 0]

Architecture: transformers' Llama, 4 layers, width 128, 8 query heads / 2 KV heads (head
dim 16), SwiGLU 384, RoPE, tied embeddings, 256 byte tokens. Trained from scratch on CPU.

Data, per step (``hydracc.tasks``): a batch of ``--batch`` rows of ``--seq-len`` bytes mixing
  - text: random windows of the training part of the Python standard library's source
    (held-out files are never seen; see ``hydracc.tasks.stdlib_corpus``);
  - MQAR (multi-query associative recall): up to ``pairs`` key-value pairs from 64 key and 64
    value symbols, filler, then every key queried; loss on the answers only;
  - passkey: a 5-digit key hidden in filler sentences, asked at the end; loss on the digits.
A curriculum moves from MQAR-heavy batches with 2-6 pairs to a text-heavier mix with up to
24 pairs over the first 60% of steps. The three losses are averaged with fixed weights.

Status (measured 2026-11-27 on the 2-core CPU machine): this recipe learns text (held-out
~1.2-1.4 nats/byte by step 3000) and passkey retrieval (loss < 0.01 by step 750, 0.2 s/step),
but MQAR stays on the "some value seen in context" plateau (loss ~2.2, about 1/pairs
accuracy) through step 3000 of 6000; probes with MQAR-only data, 2 or 4 layers, 8 or 2 KV
heads, 16 or 64 keys, lr 1e-3 to 5e-3 and a dense induction side task stayed on the same
plateau for 1,500-5,000 steps, and a 4-layer MQAR-only run for 17,750 steps (28 min) too: its
35% at 8 pairs is exactly "answer a context value not yet asked" (H(8)/8), a shortcut that
needs no key-value binding. No example model is shipped until a recipe that recalls is found.

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

from hydracc.byte_tokenizer import save_byte_tokenizer
from hydracc.tasks import IGNORE, VOCAB_SIZE, mqar_example, passkey_example, stack, stdlib_corpus, text_batch


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, attention_dropout=0.0,
    )


def schedule(progress: float) -> tuple[int, float, float]:
    """(max MQAR pairs, share of MQAR rows, share of passkey rows) at ``progress`` in [0, 1]."""
    ramp = min(1.0, progress / 0.6)
    max_pairs = int(round(6 + ramp * (24 - 6)))
    mqar_share = 0.6 - 0.25 * ramp
    return max_pairs, mqar_share, 0.15


def make_batch(step: int, steps: int, args, corpus, rng: np.random.Generator):
    max_pairs, mqar_share, pk_share = schedule(step / max(1, steps))
    n_mqar = int(round(args.batch * mqar_share))
    n_pk = int(round(args.batch * pk_share))
    n_text = args.batch - n_mqar - n_pk
    mqar = stack([mqar_example(int(rng.integers(2, max_pairs + 1)), args.seq_len, rng) for _ in range(n_mqar)])
    passkey = stack([passkey_example(args.seq_len, rng) for _ in range(n_pk)])
    text = text_batch(corpus.train, n_text, args.seq_len, rng)
    groups = {"mqar": mqar, "text": text, "passkey": passkey}
    return {k: (torch.from_numpy(v[0]), torch.from_numpy(v[1])) for k, v in groups.items()}


WEIGHTS = {"text": 1.0, "mqar": 1.0, "passkey": 0.5}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("examples/tiny-llama"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    corpus = stdlib_corpus()
    model = AutoModelForCausalLM.from_config(model_config(), attn_implementation="sdpa")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
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
        batch = make_batch(step, args.steps, args, corpus, rng)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        losses = {}
        total = torch.zeros(())
        for name, (x, y) in batch.items():
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1), ignore_index=IGNORE)
            losses[name] = loss.item()
            total = total + WEIGHTS[name] * loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            entry = {"step": step, "seconds": round(time.time() - start, 1), "lr": lr_at(step),
                     "max_pairs": schedule(step / args.steps)[0], **{k: round(v, 4) for k, v in losses.items()}}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    elapsed = time.time() - start
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    save_byte_tokenizer(args.out)
    meta = {
        "seconds": round(elapsed, 1), "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len,
        "lr": args.lr, "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "python": sys.version.split()[0], "corpus": corpus.source, "train_files": corpus.train_files,
        "heldout_files": corpus.heldout_files, "train_bytes": int(len(corpus.train)), "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"trained {args.steps} steps in {elapsed / 60:.1f} min -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
