"""Tasks a real language model can be judged by, written as text through its own tokenizer.

Used for models with a real tokenizer (``TokenSpace.text``: a ``tokenizer.json`` and a vocabulary of
at least ``TEXT_MIN_VOCAB`` ids); byte-level and toy models keep the tasks of ``tasks`` / ``probes``.

Decisions:
- All text is held-out prose (``prose.prose_corpus().heldout``: Python's reference docs and licence
  texts that the built-in calibration never reads), cut into sentences; the filler of every task is
  a run of consecutive sentences from a seeded start, so it reads as natural text.
- Inputs are built as strings and tokenized whole, with the special tokens the tokenizer itself
  adds (a BOS when its post-processor puts one; none when it does not). Lengths are therefore
  approximate (filler is added sentence by sentence up to the target); the scorers report the mean.
- Formats are plain text completions, not the chat template: base models have no template, and
  SmolLM2-135M-Instruct answered the plain passkey more often than the templated one (3/4 and 2/4
  at 1k tokens). None of them is a format the built-in calibration writes ("pass key" sentences in
  repeated filler, id-space pairs): these use "magic number" and "code for CITY" sentences and
  random words from the prose.
- passkey: a 5-digit key in one sentence pair at a seeded depth, asked at the end; answered by
  greedy generation, right when the first run of digits generated equals the key.
- kv_lookup: ``pairs`` sentences "The code for CITY is NNNN." at seeded places in the filler, then
  "The code for CITY is" for one of them; generated, exact match of the digits.
- copy: a span of random words (drawn from the prose's own words, so only copying predicts it),
  near the start, filler, and the same span again at the end; scored teacher-forced: the argmax at
  every token of the repeat after its first.
- Every builder takes a ``numpy.random.Generator``; evaluate seeds one per task and cell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from hydracc.evaluation.prose import prose_corpus

IGNORE = -100
TEXT_MIN_VOCAB = 4096
"""A tokenizer.json and at least this many ids: a real LM's vocabulary (32k-260k), not a toy or byte one."""
CITIES = (
    "Paris", "London", "Tokyo", "Cairo", "Lima", "Oslo", "Madrid", "Rome", "Berlin", "Dublin", "Vienna", "Prague",
    "Warsaw", "Lisbon", "Athens", "Helsinki", "Moscow", "Delhi", "Beijing", "Seoul", "Bangkok", "Jakarta", "Manila",
    "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Havana", "Bogota", "Santiago", "Nairobi", "Lagos", "Dakar",
    "Tunis", "Istanbul", "Tehran", "Baghdad", "Kabul", "Hanoi",
)
PASSKEY_NEEDLE = "The magic number is {key}. Remember it. {key} is the magic number."
PASSKEY_ASK = "\n\nWhat is the magic number? The magic number is"
KV_LINE = "The code for {key} is {value}."
KV_ASK = "\n\nThe code for {key} is"


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the calls the tasks need."""

    tokenizer: Any

    def ids(self, text: str, *, special: bool = True) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=special).ids, dtype=np.int64)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @property
    def prefix(self) -> np.ndarray:
        """What the tokenizer puts before any text (a BOS, or nothing)."""
        full, bare = self.ids("a"), self.ids("a", special=False)
        at = next((i for i in range(len(full) - len(bare) + 1) if list(full[i : i + len(bare)]) == list(bare)), 0)
        return full[:at]

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """The held-out prose as sentences, in order."""
    text = prose_corpus().heldout
    parts = re.split(r"(?<=[.!?:;])\s+|\n\n", text)
    # no run-ons (tables, long lists): a filler sentence stays short next to the target lengths
    return tuple(p.strip() for p in parts if sum(c.isalpha() for c in p) >= 3 and len(p) <= 400)


@lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """Distinct lowercase words (3-10 letters) of the held-out prose, sorted."""
    return tuple(sorted({w for w in re.findall(r"\b[a-z]{3,10}\b", prose_corpus().heldout)}))


def _filler(tok: TextTokenizer, budget: int, rng: np.random.Generator) -> list[str]:
    """Consecutive sentences from a seeded start (wrapping around) holding about ``budget`` tokens."""
    sents = sentences()
    i = int(rng.integers(0, len(sents)))
    out: list[str] = []
    used = 0
    while used < budget:
        s = sents[i % len(sents)]
        used += tok.count(" " + s)
        out.append(s)
        i += 1
    return out


def _insert(filler: list[str], items: list[str], rng: np.random.Generator, *, lo: float = 0.0, hi: float = 1.0) -> str:
    """``items`` placed between sentences of ``filler`` at seeded depths in ``[lo, hi)`` of it, in order."""
    n = len(filler)
    places = sorted(int(rng.integers(int(lo * n), max(int(lo * n) + 1, int(hi * n)))) for _ in items)
    out: list[str] = []
    k = 0
    for i, s in enumerate(filler):
        while k < len(items) and places[k] == i:
            out.append(items[k])
            k += 1
        out.append(s)
    out.extend(items[k:])
    return " ".join(out)


@dataclass(frozen=True)
class Prompt:
    ids: np.ndarray
    answer: str


def passkey_prompt(tok: TextTokenizer, length: int, rng: np.random.Generator, *, digits: int = 5) -> Prompt:
    key = "".join(str(d) for d in rng.integers(0, 10, size=digits))
    needle = PASSKEY_NEEDLE.format(key=key)
    budget = length - tok.count(" " + needle) - tok.count(PASSKEY_ASK) - len(tok.prefix)
    text = _insert(_filler(tok, budget, rng), [needle], rng)
    return Prompt(tok.ids(text + PASSKEY_ASK), key)


def kv_prompt(tok: TextTokenizer, length: int, rng: np.random.Generator, *, pairs: int = 6) -> Prompt:
    keys = [CITIES[i] for i in rng.choice(len(CITIES), size=pairs, replace=False)]
    values = [str(v) for v in rng.choice(np.arange(1000, 10000), size=pairs, replace=False)]
    lines = [KV_LINE.format(key=k, value=v) for k, v in zip(keys, values, strict=True)]
    asked = int(rng.integers(0, pairs))
    ask = KV_ASK.format(key=keys[asked])
    budget = length - sum(tok.count(" " + line) for line in lines) - tok.count(ask) - len(tok.prefix)
    text = _insert(_filler(tok, budget, rng), lines, rng, hi=0.9)
    return Prompt(tok.ids(text + ask), values[asked])


def copy_row(tok: TextTokenizer, length: int, rng: np.random.Generator, *, span_words: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(ids[T], labels[T])``: labels score the repeat of the span (after its first token), next-token layout."""
    vocab = words()
    span = " ".join(vocab[i] for i in rng.choice(len(vocab), size=span_words, replace=False))
    span_ids = tok.ids(" " + span, special=False)
    lead = _filler(tok, max(1, length // 10), rng)
    budget = length - len(tok.prefix) - 2 * len(span_ids) - tok.count(" " + " ".join(lead))
    rest = _filler(tok, max(1, budget), rng)
    head = tok.ids(" ".join(lead) + " " + span + ". " + " ".join(rest))
    tokens = np.concatenate([head, span_ids])
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    start = len(head)
    labels[start + 1 :] = tokens[start + 1 :]
    return tokens[:-1], labels[1:]


def prose_windows(tok: TextTokenizer, windows: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``[windows, prefix + seq_len]`` rows of held-out prose (each after the tokenizer's own prefix, if any)
    and the prefix length; windows start at seeded places of the token stream."""
    stream = tok.ids(prose_corpus().heldout, special=False)
    prefix = tok.prefix
    if len(stream) < seq_len + 1:
        raise ValueError(f"the held-out prose is {len(stream)} tokens here, fewer than a {seq_len}-token window")
    starts = rng.integers(0, len(stream) - seq_len, size=windows)
    return np.stack([np.concatenate([prefix, stream[a : a + seq_len]]) for a in starts]), len(prefix)


def first_digits(text: str) -> str:
    """The first run of digits in a generated answer ("" when there is none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""
