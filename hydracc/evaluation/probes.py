"""Evaluation data in any model's own tokens: held-out text, key-value recall and passkey probes.

Decisions:
- Byte-level models (vocab 256, the example models) keep the byte tasks of ``tasks``, whose format
  they were trained on; every other vocabulary gets probes built from its own ids: text through the
  checkpoint's ``tokenizer.json`` (a data file, read with ``tokenizers``), recall and passkey from a
  pool of ordinary ids (the tokenizer's special tokens left out; without a tokenizer, the middle half
  of the id space, away from the special ids vocabularies put at either end).
- Models with a real tokenizer (``TokenSpace.text``) get the text tasks of ``text_tasks`` by default;
  these probes stay available to them by name.
- A probe is ``(tokens[T], labels[T])`` with labels ``IGNORE`` except at scored positions, the layout
  of ``tasks``, so the same scorers run on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hydracc.errors import HydraError
from hydracc.evaluation.tasks import (
    IGNORE,
    PASSKEY_FILLER,
    PASSKEY_QUESTION,
    VOCAB_SIZE,
    mqar_example,
    passkey_example,
    stdlib_corpus,
)


class ProbeError(HydraError):
    """A probe cannot be built for this model (no tokenizer for text, a vocabulary too small)."""


@dataclass
class TokenSpace:
    """How to write data in one model's tokens."""

    vocab_size: int
    tokenizer: Any = None
    """A ``tokenizers.Tokenizer`` (``None``: bytes for vocab 256, ids only otherwise)."""
    pool: np.ndarray | None = None
    """Ordinary ids the id-space probes draw from."""

    @property
    def bytes(self) -> bool:
        return self.vocab_size == VOCAB_SIZE

    @property
    def text(self) -> bool:
        """A real tokenizer (``text_tasks.TEXT_MIN_VOCAB`` ids or more): the text tasks apply."""
        from hydracc.evaluation.text_tasks import TEXT_MIN_VOCAB

        return self.tokenizer is not None and self.vocab_size >= TEXT_MIN_VOCAB

    @property
    def describe(self) -> str:
        return "bytes" if self.bytes else ("the checkpoint's tokenizer.json" if self.tokenizer is not None else "ids only")

    def encode(self, text: str) -> np.ndarray:
        if self.bytes:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if self.tokenizer is None:
            raise ProbeError(
                f"this checkpoint has no tokenizer.json and its vocabulary ({self.vocab_size}) is not bytes, so text "
                "cannot be written in its tokens",
                hint="give token ids: --calib ids.npy (an integer array [samples, seq_len] or a 1-d stream)",
            )
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def token_space(root: Path, vocab_size: int) -> TokenSpace:
    """The token space of the checkpoint in ``root`` (its ``tokenizer.json`` if any)."""
    if vocab_size == VOCAB_SIZE:
        return TokenSpace(vocab_size)
    tokenizer = None
    special: set[int] = set()
    path = root / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises its own exception type
            raise ProbeError(f"{path} is not a readable tokenizer: {exc}") from exc
        special = {int(i) for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}
    lo, hi = vocab_size // 4, max(vocab_size // 4 + 1, 3 * vocab_size // 4)
    pool = np.array([i for i in range(lo, hi) if i not in special], dtype=np.int64)
    return TokenSpace(vocab_size, tokenizer, pool)


def heldout_ids(space: TokenSpace, max_tokens: int) -> np.ndarray:
    """Held-out standard-library text (never in the built-in calibration or training) in the model's tokens."""
    text = stdlib_corpus().heldout
    if space.bytes:
        return text[:max_tokens].astype(np.int64)
    # roughly 3-4 bytes per token for code; read a little more than needed
    return space.encode(bytes(text[: 6 * max_tokens].astype(np.uint8)).decode("utf-8", errors="ignore"))[:max_tokens]


def _pool(space: TokenSpace, need: int) -> np.ndarray:
    pool = space.pool if space.pool is not None else np.arange(space.vocab_size // 4, 3 * space.vocab_size // 4)
    if len(pool) < need:
        raise ProbeError(f"the vocabulary ({space.vocab_size}) is too small for this probe (needs {need} ordinary ids)")
    return pool


def recall_probe(space: TokenSpace, pairs: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Key-value recall: ``pairs`` (key, value) tokens, filler, then every key again, scored on its value.

    Byte models get ``tasks.mqar_example`` (the format they know); others draw keys, values and filler
    from the pool, all distinct, so only the key-value binding predicts an answer.
    """
    if space.bytes:
        return mqar_example(pairs, seq_len, rng)
    pool = _pool(space, 2 * pairs + 1)
    if seq_len < 4 * pairs:
        raise ProbeError(f"a recall probe with {pairs} pairs needs at least {4 * pairs} tokens, got {seq_len}")
    chosen = rng.choice(pool, size=2 * pairs, replace=False)
    keys, values = chosen[:pairs], chosen[pairs:]
    context = np.stack([keys, values], axis=1).reshape(-1)
    order = rng.permutation(pairs)
    queries = np.stack([keys[order], values[order]], axis=1).reshape(-1)
    filler_len = seq_len + 1 - len(context) - len(queries)
    rest = np.setdiff1d(pool, chosen)
    filler = rng.choice(rest if len(rest) else pool, size=filler_len)
    tokens = np.concatenate([context, filler, queries]).astype(np.int64)
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    answers = len(context) + filler_len + 1 + 2 * np.arange(pairs)
    labels[answers] = tokens[answers]
    return tokens[:-1], labels[1:]


def passkey_probe(space: TokenSpace, seq_len: int, rng: np.random.Generator, *, digits: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """A passkey hidden in filler and asked at the end, scored on every token of the key.

    Byte models get ``tasks.passkey_example``; with a tokenizer the same sentences are written in the
    model's tokens; with ids only, the key is ``digits`` pool ids after a fixed marker.
    """
    if space.bytes:
        return passkey_example(seq_len, rng, digits=digits)
    if space.tokenizer is not None:
        key = "".join(str(d) for d in rng.integers(0, 10, size=digits))
        needle = space.encode(f"The pass key is {key}. Remember it. ")
        key_ids = space.encode(" " + key)  # the key as it follows "... is" in running text
        tail = np.concatenate([space.encode(PASSKEY_QUESTION.rstrip()), key_ids])
        unit = space.encode(PASSKEY_FILLER)
    else:
        pool = _pool(space, digits + 12)
        picked = rng.choice(pool, size=digits + 12, replace=False)
        marker, key_ids, unit = picked[:4], picked[4 : 4 + digits], picked[4 + digits :]
        needle = np.concatenate([marker, key_ids])
        tail = np.concatenate([marker, key_ids])
    room = seq_len + 1 - len(tail) - len(needle)
    if room < 0:
        raise ProbeError(f"a passkey probe needs at least {seq_len - room} tokens, got {seq_len}")
    filler = np.resize(unit, room)
    at = int(rng.integers(0, room + 1))
    tokens = np.concatenate([filler[:at], needle, filler[at:], tail]).astype(np.int64)
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    labels[-len(key_ids):] = tokens[-len(key_ids):]
    return tokens[:-1], labels[1:]
