"""Train the second example model: a small Qwen3 with its own BPE vocabulary and its own recall format.

Usage: python examples/train_tiny_qwen.py [--out examples/tiny-qwen] [--steps N] [--seed 0]

Why a second model: hydracc's head selection must find the recall heads of models it was not
tuned on. This one differs from ``examples/tiny-llama`` in everything the planner could have
been fitted to: the architecture (transformers' Qwen3: q/k norms, no biases), the vocabulary
(a 1,024-token byte-level BPE trained here on the standard library's training split, not
bytes), and the recall format, which hydracc's built-in calibration never contains:

    <set> k1 v1 <;> <set> k2 v2 <;> ... text ... <get> k2 v2 <;> <get> k1 v1 <;>

keys and values drawn from 96 ordinary word tokens each; the loss is on the answers.

Two phases, one optimizer and one learning-rate schedule. Phase 1 (``--warm-steps``): induction
rows alone (random pool tokens with a span repeated at a random distance), 64 rows of 64 tokens a
step, until the copying circuit forms: its loss falls from chance to ~0.1 within a few hundred
steps once it starts (step ~950 with seed 0). Phase 2 (``--steps``): 128-token rows of text,
recall and induction. Why: mixed from the start, the circuit had not formed in 5,000 steps
(30 minutes), and the model stayed on the "answer a stored value not yet asked" shortcut; short
induction-only rows give it some 60,000 examples in the first 5 minutes (see the card).

Architecture: 4 layers, width 128, 8 query heads / 2 KV heads (head dim 16), SwiGLU 384, RoPE
theta 1e6, tied embeddings. Besides the checkpoint and ``tokenizer.json`` it writes, from
held-out text and fresh seeds, ``calib.npy`` (16 x 256 token ids: half recall rows, half text;
for ``--calib``) and ``recall.npz`` (recall rows at 128 and 256 tokens with their answer labels;
for ``hydracc eval --recall``), and ``training_log.json``.

The defaults are the committed recipe. Other flags reproduce the variants the card lists as tried
and not kept: ``--no-adjacent`` (``<set> k <is> v <;>`` / ``<get> k <out> v``), ``--no-induction-pool``
(induction spans from the whole vocabulary), ``--warm-steps 0`` (no phase 1), ``--qk-init`` (starting
q/k-norm weights), ``--theta``, ``--heads``, ``--layers``, ``--spans`` (induction span lengths),
``--weights``, ``--pool unused`` (keys and values from tokens the text never contains, 64 each, as
``tiny-llama``'s symbols are) and ``--rows``, whose ``passkey=N`` adds rows with
``<is> w1..w5 <;>`` hidden in text and ``<out> w1..w5`` at the end (loss on the five words).
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

from hydracc.evaluation.tasks import IGNORE, stdlib_corpus

BPE_VOCAB = 1024
MARKERS = ["<set>", "<is>", "<;>", "<get>", "<out>"]
POOL = 96
"""Key and value tokens each, ordinary words of the trained vocabulary."""
UNUSED_POOL = 64
"""Key and value tokens each with ``--pool unused`` (the tokenizer has about 180 the text never uses)."""
ROWS = {"text": 14, "recall": 14, "induction": 8, "passkey": 0}
WEIGHTS = {"text": 1.0, "recall": 1.0, "induction": 0.5, "passkey": 0.5}
ADJACENT = True


def train_tokenizer(text: bytes):
    """A byte-level BPE over the training text with the markers as special tokens (ids 0-4)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=MARKERS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = [text[i : i + 100_000].decode("utf-8", "replace") for i in range(0, min(len(text), 4_000_000), 100_000)]
    tok.train_from_iterator(chunks, trainer)
    return tok


def unused_pools(vocab: int, text: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Key and value pools of ``size`` ids each from tokens that never occur in ``text`` (bytes no source file has)."""
    counts = np.bincount(text, minlength=vocab)
    unused = np.array([i for i in range(len(MARKERS), vocab) if counts[i] == 0])
    if len(unused) < 2 * size:
        raise SystemExit(f"the tokenizer has only {len(unused)} unused tokens, need {2 * size}")
    chosen = np.random.default_rng(1234).permutation(unused)[: 2 * size]
    return np.sort(chosen[:size]), np.sort(chosen[size:])


def word_pools(tok) -> tuple[np.ndarray, np.ndarray]:
    """Key and value pools: distinct ids of tokens that are 3+ letters, with or without a leading space."""
    vocab = tok.get_vocab()
    words = sorted(i for t, i in vocab.items() if len(t.lstrip("Ġ")) >= 3 and t.lstrip("Ġ").isalpha())
    if len(words) < 2 * POOL:
        raise SystemExit(f"the tokenizer has only {len(words)} word tokens, need {2 * POOL}")
    rng = np.random.default_rng(1234)
    chosen = rng.permutation(words)[: 2 * POOL]
    return np.sort(chosen[:POOL]), np.sort(chosen[POOL:])


def recall_example(pairs: int, seq_len: int, text: np.ndarray, keys: np.ndarray, values: np.ndarray,
                   rng: np.random.Generator, markers: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """One recall row of ``seq_len`` tokens and its labels (the answers only)."""
    k = rng.choice(keys, size=pairs, replace=False)
    v = rng.choice(values, size=pairs, replace=True)
    head: list[int] = []
    sep = [] if ADJACENT else [markers["<is>"]]
    ask = [] if ADJACENT else [markers["<out>"]]
    for a, b in zip(k, v):
        head += [markers["<set>"], int(a), *sep, int(b), markers["<;>"]]
    order = rng.permutation(pairs)
    tail: list[int] = []
    answers: list[int] = []
    for i in order:
        answers.append(len(tail) + 2 + len(ask))  # the value's position within the tail
        tail += [markers["<get>"], int(k[i]), *ask, int(v[i]), markers["<;>"]]
    gap = seq_len - len(head) - len(tail)
    if gap < 0:
        raise ValueError(f"{pairs} pairs do not fit in {seq_len} tokens")
    start = int(rng.integers(0, len(text) - gap - 1))
    ids = np.array(head + text[start : start + gap].tolist() + tail, dtype=np.int64)
    labels = np.full(seq_len, IGNORE, dtype=np.int64)
    base = len(head) + gap
    for a in answers:
        labels[base + a - 1] = ids[base + a]  # predicted at the position before the answer
    return ids, labels


def passkey_rows(rows: int, seq_len: int, text: np.ndarray, values: np.ndarray, rng: np.random.Generator,
                 markers: dict[str, int], length: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Text with ``<is> w1..w5 <;>`` hidden at a random place, then ``<out> w1..w5`` at the end; loss on the key."""
    x = np.empty((rows, seq_len), dtype=np.int64)
    y = np.full((rows, seq_len), IGNORE, dtype=np.int64)
    for r in range(rows):
        key = rng.choice(values, size=length)
        hidden = [markers["<is>"], *key.tolist(), markers["<;>"]]
        ask = [markers["<out>"], *key.tolist()]
        room = seq_len - len(hidden) - len(ask)
        start = int(rng.integers(0, len(text) - room - 1))
        filler = text[start : start + room].tolist()
        at = int(rng.integers(0, room - 8))
        x[r] = filler[:at] + hidden + filler[at:] + ask
        y[r, seq_len - length - 1 : seq_len - 1] = key
    return x, y


def text_rows(text: np.ndarray, rows: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    starts = rng.integers(0, len(text) - seq_len - 1, size=rows)
    x = np.stack([text[s : s + seq_len] for s in starts])
    y = np.stack([text[s + 1 : s + seq_len + 1] for s in starts])
    return x, y


def induction_rows(rows: int, seq_len: int, tokens: np.ndarray, rng: np.random.Generator,
                   spans: tuple[int, int] = (4, 16)) -> tuple[np.ndarray, np.ndarray]:
    """Rows of random ``tokens`` in which a span of ``spans`` tokens repeats later; loss on the repeat."""
    x = rng.choice(tokens, size=(rows, seq_len))
    y = np.full((rows, seq_len), IGNORE, dtype=np.int64)
    for r in range(rows):
        span = int(rng.integers(spans[0], spans[1] + 1))
        first = int(rng.integers(0, seq_len // 2 - span))
        second = int(rng.integers(first + span, seq_len - span))
        x[r, second : second + span] = x[r, first : first + span]
        y[r, second : second + span - 1] = x[r, second + 1 : second + span]
    return x, y


def model_config(vocab: int, width: int = 128, layers: int = 4, theta: float = 1e6, heads: int = 8):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=2, head_dim=width // heads, max_position_embeddings=2048,
        rope_theta=theta, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attention_dropout=0.0, use_sliding_window=False,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("examples/tiny-qwen"))
    ap.add_argument("--steps", type=int, default=3400, help="phase 2 steps (the mixture)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--qk-init", type=float, default=1.0)
    ap.add_argument("--theta", type=float, default=1e6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adjacent", action=argparse.BooleanOptionalAction, default=True,
                    help="<set> k v <;> / <get> k v: the value right after its key (else <set> k <is> v <;> / <get> k <out> v)")
    ap.add_argument("--induction-pool", action=argparse.BooleanOptionalAction, default=True,
                    help="induction spans from the key and value tokens (else from the whole vocabulary)")
    ap.add_argument("--pool", choices=["words", "unused"], default="words",
                    help="keys and values: word tokens, or tokens that never occur in the text")
    ap.add_argument("--spans", default="4,16", help="shortest and longest induction span, e.g. 16,48")
    ap.add_argument("--weights", default=None, help="loss weights, e.g. induction=1.0")
    ap.add_argument("--rows", default=None, help="rows per step, e.g. text=4,recall=8,induction=4,passkey=4")
    ap.add_argument("--warm-steps", type=int, default=1800,
                    help="phase 1 steps: induction rows alone (loss weight 1), before the mixture, so that the copying "
                         "circuit forms first")
    ap.add_argument("--warm-rows", type=int, default=64, help="induction rows per warm step")
    ap.add_argument("--warm-len", type=int, default=64, help="tokens per warm row")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    global ADJACENT
    ADJACENT = args.adjacent
    for option, table, kind in ((args.rows, ROWS, int), (args.weights, WEIGHTS, float)):
        for item in (option.split(",") if option else []):
            name, _, value = item.partition("=")
            if name not in table:
                ap.error(f"unknown name {name!r} in {item!r}; known: {', '.join(table)}")
            try:
                table[name] = kind(value)
            except ValueError:
                ap.error(f"{item!r}: {value!r} is not {'a whole number' if kind is int else 'a number'}")
            if table[name] < 0 or (table is ROWS and name != "passkey" and table[name] == 0):
                ap.error(f"{item!r}: text, recall and induction need at least one row, and no value can be negative")
    try:
        spans = tuple(int(v) for v in args.spans.split(","))
    except ValueError:
        spans = ()
    shortest_row = min(args.seq_len, args.warm_len) if args.warm_steps else args.seq_len
    if len(spans) != 2 or not 1 <= spans[0] <= spans[1] < shortest_row // 2:
        ap.error(f"--spans needs two lengths, shortest first, under half of --seq-len (and of --warm-len with "
                 f"--warm-steps); got {args.spans}")
    if min(args.steps, args.warm_steps) < 0 or args.warm_rows < 1 or args.log_every < 1:
        ap.error("--steps and --warm-steps cannot be negative; --warm-rows and --log-every need at least 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    corpus = stdlib_corpus()
    train_bytes = corpus.train.astype(np.uint8).tobytes()
    held_bytes = corpus.heldout.astype(np.uint8).tobytes()
    tok = train_tokenizer(train_bytes)
    markers = {m: tok.token_to_id(m) for m in MARKERS}
    encode = lambda data: np.array(tok.encode(data[:3_000_000].decode("utf-8", "replace")).ids, dtype=np.int64)  # noqa: E731
    train_text, held_text = encode(train_bytes), encode(held_bytes)
    vocab = tok.get_vocab_size()
    keys, values = word_pools(tok) if args.pool == "words" else unused_pools(vocab, train_text, UNUSED_POOL)
    induction_tokens = np.concatenate([keys, values]) if args.induction_pool else np.arange(len(MARKERS), vocab)
    model = AutoModelForCausalLM.from_config(model_config(vocab, layers=args.layers, theta=args.theta, heads=args.heads),
                                             attn_implementation="sdpa")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(args.qk_init)
            layer.self_attn.k_norm.weight.fill_(args.qk_init)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    total_steps = args.warm_steps + args.steps
    warmup = max(1, min(200, total_steps // 10))

    def lr_at(step: int) -> float:
        """One schedule over both phases: linear warm-up, then cosine to 10%."""
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup))))

    def max_pairs(step: int) -> int:
        return int(round(4 + min(1.0, step / max(1, args.steps) / 0.5) * 8))

    log: list[dict] = []
    start = time.time()

    def update(loss: torch.Tensor, step: int, last: int, **entry) -> None:
        """One optimizer step at ``step`` of both phases; log ``entry`` every ``--log-every`` steps and at ``last``."""
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == last:
            log.append({"step": step, "seconds": round(time.time() - start, 1), **entry})
            print(json.dumps(log[-1]), flush=True)

    model.train()
    for step in range(args.warm_steps):  # phase 1: the copying circuit alone, in short rows
        x, y = (torch.from_numpy(a) for a in induction_rows(args.warm_rows, args.warm_len, induction_tokens, rng, spans))
        loss = F.cross_entropy(model(input_ids=x).logits.reshape(-1, vocab), y.reshape(-1), ignore_index=IGNORE)
        update(loss, step, args.warm_steps - 1, phase="warm", induction=round(loss.item(), 4))
    for step in range(args.steps):
        top = max_pairs(step)
        groups = {
            "text": text_rows(train_text, ROWS["text"], args.seq_len, rng),
            "recall": tuple(np.stack(z) for z in zip(*[
                recall_example(int(rng.integers(2, top + 1)), args.seq_len, train_text, keys, values, rng, markers)
                for _ in range(ROWS["recall"])])),
            "induction": induction_rows(ROWS["induction"], args.seq_len, induction_tokens, rng, spans),
        }
        if ROWS["passkey"]:
            groups["passkey"] = passkey_rows(ROWS["passkey"], args.seq_len, train_text, values, rng, markers)
        x = torch.from_numpy(np.concatenate([g[0] for g in groups.values()]))
        y = torch.from_numpy(np.concatenate([g[1] for g in groups.values()]))
        logits = model(input_ids=x).logits
        total, row, losses, accuracy = torch.zeros(()), 0, {}, 0.0
        for name, (gx, _gy) in groups.items():
            lg, lb = logits[row : row + len(gx)], y[row : row + len(gx)]
            loss = F.cross_entropy(lg.reshape(-1, vocab), lb.reshape(-1), ignore_index=IGNORE)
            losses[name] = loss.item()
            total = total + WEIGHTS[name] * loss
            if name == "recall":
                mask = lb != IGNORE
                accuracy = ((lg.argmax(-1) == lb) & mask).sum().item() / max(1, mask.sum().item())
            row += len(gx)
        update(total, args.warm_steps + step, total_steps - 1, max_pairs=top, **{k: round(v, 4) for k, v in losses.items()},
               recall_batch_accuracy=round(accuracy, 3))
    elapsed = time.time() - start
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(args.out)
    # held-out data for planning and evaluation: fresh seeds, held-out text, never trained on
    eval_rng = np.random.default_rng(args.seed + 1000)
    calib_text, _ = text_rows(held_text, 8, 256, eval_rng)
    calib_recall = np.stack([recall_example(int(eval_rng.integers(4, 13)), 256, held_text, keys, values, eval_rng, markers)[0]
                             for _ in range(8)])
    np.save(args.out / "calib.npy", np.concatenate([calib_recall, calib_text]))
    probes: dict[str, np.ndarray] = {}
    for length in (128, 256):
        rows = [recall_example(int(eval_rng.integers(4, 13)), length, held_text, keys, values, eval_rng, markers)
                for _ in range(64)]
        probes[f"ids_{length}"] = np.stack([r[0] for r in rows])
        probes[f"labels_{length}"] = np.stack([r[1] for r in rows])
    np.savez(args.out / "recall.npz", **probes)
    meta = {
        "seconds": round(elapsed, 1), "steps": args.steps, "warm_steps": args.warm_steps, "warm_rows": args.warm_rows,
        "warm_len": args.warm_len, "rows": ROWS, "weights": WEIGHTS, "seq_len": args.seq_len,
        "lr": args.lr, "seed": args.seed, "threads": args.threads, "adjacent": args.adjacent,
        "induction_pool": args.induction_pool, "spans": list(spans), "qk_init": args.qk_init, "theta": args.theta, "heads": args.heads,
        "layers": args.layers, "torch": torch.__version__, "vocab": vocab,
        "markers": markers, "keys": keys.tolist(), "values": values.tolist(), "python": sys.version.split()[0],
        "corpus": corpus.source, "train_tokens": int(len(train_text)), "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"trained {total_steps} steps in {elapsed / 60:.1f} min -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
