"""Data for the example model and for ``hydracc eval``: bytes, a text corpus, MQAR, passkey.

Design decisions:
- Tokens are bytes (ids 0-255), so no tokenizer file can disagree with the data. Text is
  ASCII in practice; the synthetic tasks use the non-ASCII bytes as symbols: keys are
  ``KEY_BASE + i``, values ``VALUE_BASE + i``, so they never collide with text.
- The text corpus is the ``.py`` source of the running Python's standard library (present on
  every machine of this kind), minus tests, ``idlelib`` and site-packages, in sorted path
  order. A file is held out when ``crc32(relative path) % 10 == 0``; the rest is training
  text. The split is by file, so no held-out line is ever trained on.
- Every generator takes a ``numpy.random.Generator``; the same seed gives the same batch
  on any machine (the text corpus depends on the Python version, and says so).
- MQAR follows Zoology: ``k1 v1 k2 v2 ... kn vn``, then filler, then queried keys each
  followed by its value; a prediction is scored at each queried value. Passkey follows
  Mohtashami & Jaggi: a 5-digit key hidden in repeated filler sentences, asked at the end.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
KEY_BASE = 128
VALUE_BASE = 192
MAX_SYMBOLS = 64
IGNORE = -100
"""Label value for positions that carry no loss / no score."""

_EXCLUDED_PARTS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int] | np.ndarray) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Corpus:
    """Training and held-out text as byte arrays, and where they came from."""

    train: np.ndarray
    heldout: np.ndarray
    source: str
    train_files: int
    heldout_files: int


@lru_cache(maxsize=2)
def stdlib_corpus(max_bytes: int = 40_000_000) -> Corpus:
    """The standard library's Python source, split by file into train and held-out text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_EXCLUDED_PARTS & set(p.relative_to(root).parts)))
    train: list[bytes] = []
    held: list[bytes] = []
    n_train = n_held = 0
    size = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if size + len(data) > max_bytes:
            break
        size += len(data)
        if zlib.crc32(rel.encode()) % 10 == 0:
            held.append(data)
            n_held += 1
        else:
            train.append(data)
            n_train += 1
    sep = b"\n\n"
    return Corpus(
        np.frombuffer(sep.join(train), dtype=np.uint8).astype(np.int64),
        np.frombuffer(sep.join(held), dtype=np.uint8).astype(np.int64),
        f"{root} (*.py, no tests/idlelib/site-packages)",
        n_train,
        n_held,
    )


def text_batch(text: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of ``text``: inputs ``[batch, seq_len]`` and next-byte labels."""
    starts = rng.integers(0, len(text) - seq_len - 1, size=batch)
    windows = np.stack([text[s : s + seq_len + 1] for s in starts])
    return windows[:, :-1], windows[:, 1:].copy()


def mqar_example(
    pairs: int, seq_len: int, rng: np.random.Generator, *, num_keys: int = 64, num_values: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """One MQAR sequence of exactly ``seq_len`` tokens and its labels (scored at answers only).

    ``pairs`` distinct keys drawn from ``num_keys`` symbols, each with a value from
    ``num_values`` symbols; then filler bytes (lowercase letters and spaces); then every key
    queried once, in a new random order, each followed by its value.
    """
    if pairs > min(num_keys, MAX_SYMBOLS) or num_values > MAX_SYMBOLS:
        raise ValueError(f"{pairs} pairs need {pairs} distinct keys; at most {min(num_keys, MAX_SYMBOLS)}")
    need = 4 * pairs + 1
    if seq_len < need:
        raise ValueError(f"MQAR with {pairs} pairs needs seq_len >= {need}, got {seq_len}")
    keys = rng.choice(num_keys, size=pairs, replace=False) + KEY_BASE
    values = rng.integers(0, num_values, size=pairs) + VALUE_BASE
    context = np.stack([keys, values], axis=1).reshape(-1)
    order = rng.permutation(pairs)
    queries = np.stack([keys[order], values[order]], axis=1).reshape(-1)
    filler_len = seq_len + 1 - len(context) - len(queries)
    alphabet = np.array(encode("abcdefghijklmnopqrstuvwxyz     "))
    filler = alphabet[rng.integers(0, len(alphabet), size=filler_len)]
    tokens = np.concatenate([context, filler, queries])
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    answer_pos = len(context) + filler_len + 1 + 2 * np.arange(pairs)
    labels[answer_pos] = tokens[answer_pos]
    return tokens[:-1], labels[1:]


def induction_example(seq_len: int, rng: np.random.Generator, *, min_span: int = 4, max_span: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A span of random symbols (bytes 128-255), random symbols, the same span again, more symbols.

    The loss is on the repeated span after its first token, which can only be predicted by
    finding the earlier occurrence of the current symbol and copying what followed it (an
    induction head). The distance between the two copies varies, so no fixed-offset
    attention solves it. Used in training only: it teaches the content matching MQAR needs.
    """
    span_len = int(rng.integers(min_span, max_span + 1))
    if seq_len + 1 < 2 * span_len:
        raise ValueError(f"induction needs seq_len >= {2 * span_len - 1}, got {seq_len}")
    symbols = 2 * MAX_SYMBOLS
    span = rng.integers(0, symbols, size=span_len) + KEY_BASE
    gap = int(rng.integers(0, seq_len + 1 - 2 * span_len + 1))
    rest = rng.integers(0, symbols, size=seq_len + 1 - 2 * span_len) + KEY_BASE
    tokens = np.concatenate([span, rest[:gap], span, rest[gap:]])
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    second = span_len + gap
    labels[second + 1 : second + span_len] = tokens[second + 1 : second + span_len]
    return tokens[:-1], labels[1:]


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "


def passkey_example(seq_len: int, rng: np.random.Generator, *, digits: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """One passkey sequence of exactly ``seq_len`` tokens; labels score the key's digits at the end."""
    key = "".join(str(d) for d in rng.integers(0, 10, size=digits))
    needle = f"The pass key is {key}. Remember it. "
    tail = encode(PASSKEY_QUESTION + key)
    room = seq_len + 1 - len(tail) - len(encode(needle))
    if room < 0:
        raise ValueError(f"passkey needs seq_len >= {seq_len - room}")
    filler = encode(PASSKEY_FILLER * (room // len(PASSKEY_FILLER) + 1))[:room]
    at = int(rng.integers(0, room + 1))
    at = filler.index(ord("T"), at) if ord("T") in filler[at:] else room  # start at a sentence
    tokens = np.array(filler[:at] + encode(needle) + filler[at:] + tail, dtype=np.int64)
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    labels[-digits:] = tokens[-digits:]
    return tokens[:-1], labels[1:]


def stack(examples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([e[0] for e in examples]), np.stack([e[1] for e in examples])
