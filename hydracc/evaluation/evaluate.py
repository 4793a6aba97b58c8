"""``hydracc eval``: what a conversion costs, measured on fixed-seed data.

Design decisions:
- Three tasks from ``hydracc.evaluation.tasks``: held-out perplexity (byte level, on the held-out
  standard-library files), MQAR accuracy over a grid of pair counts and sequence lengths,
  and passkey retrieval accuracy over context lengths. Each task draws its data from its
  own fixed seed, so two runs, and two models, see exactly the same inputs.
- Scores are teacher-forced argmax accuracies at the scored positions: an MQAR answer is
  right when the most likely next byte is the value; a passkey is right when all its
  digits are (equivalent to greedy decoding of the key). MQAR also reports the accuracy on
  each sequence's first query alone, where answering "a value not yet asked" (a shortcut
  that needs no key-value binding) scores only 1/pairs.
- Works on any causal LM with the byte vocabulary: an original checkpoint (run with SDPA)
  or a converted one (``hydracc.load``); which one is decided by the ``hydra`` config section.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hydracc.errors import HydraError
from hydracc.evaluation.tasks import IGNORE, VOCAB_SIZE, mqar_example, passkey_example, stack, stdlib_corpus

TASKS = ("ppl", "mqar", "passkey")


@dataclass(frozen=True)
class EvalSettings:
    ppl_windows: int = 64
    ppl_seq_len: int = 128
    mqar_pairs: tuple[int, ...] = (4, 8, 16)
    mqar_seq_lens: tuple[int, ...] = (128, 256)
    mqar_samples: int = 64
    passkey_lengths: tuple[int, ...] = (96, 128, 256)
    passkey_samples: int = 32
    batch: int = 16
    seed: int = 1234


@dataclass
class EvalResult:
    model: str
    converted: bool
    scores: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "converted": self.converted, **self.scores}


def load_for_eval(path: str | Path) -> tuple[torch.nn.Module, bool]:
    """The model at ``path`` (a checkpoint folder or a file in one), and whether it is converted."""
    from transformers import AutoModelForCausalLM

    from hydracc.frontend.checkpoint import open_checkpoint
    from hydracc.runtime.loader import load, quiet_transformers

    ck = open_checkpoint(path)  # the path, config and files, before transformers touches them
    ck.close()
    root, config = ck.root, ck.config
    if config.get("vocab_size") != VOCAB_SIZE:
        raise HydraError(
            f"hydracc eval's tasks are byte-level (vocab {VOCAB_SIZE}); {root} has vocab_size {config.get('vocab_size')}",
            hint="evaluate the shipped example model or a conversion of it",
        )
    if "hydra" in config:
        return load(root), True
    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(root, attn_implementation="sdpa", trust_remote_code=False, local_files_only=True)
    return model.eval(), False


def _batches(x: np.ndarray, y: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield torch.from_numpy(x[i : i + size]), torch.from_numpy(y[i : i + size])


@torch.no_grad()
def _scored(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax == label, nll) at every labelled position; both ``[B, T]``."""
    logits = model(input_ids=x).logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="none")
    return logits.argmax(-1) == y, nll.reshape(y.shape)


def perplexity(model: torch.nn.Module, s: EvalSettings, advance: Callable[[], None]) -> dict[str, float]:
    corpus = stdlib_corpus()
    rng = np.random.default_rng(s.seed)
    text = corpus.heldout
    starts = rng.integers(0, len(text) - s.ppl_seq_len - 1, size=s.ppl_windows)
    windows = np.stack([text[a : a + s.ppl_seq_len + 1] for a in starts])
    total, count = 0.0, 0
    for x, y in _batches(windows[:, :-1], windows[:, 1:].copy(), s.batch):
        _, nll = _scored(model, x, y)
        total += float(nll.sum())
        count += nll.numel()
        advance()
    mean = total / count
    return {"ppl": round(math.exp(mean), 4), "bits_per_byte": round(mean / math.log(2), 4), "tokens": count}


def mqar(model: torch.nn.Module, s: EvalSettings, advance: Callable[[], None]) -> dict[str, Any]:
    grid: dict[str, float] = {}
    correct_all = total_all = first_right = first_total = 0
    for pairs in s.mqar_pairs:
        for seq_len in s.mqar_seq_lens:
            if seq_len < 4 * pairs + 1:
                continue
            rng = np.random.default_rng([s.seed, pairs, seq_len])
            x, y = stack([mqar_example(pairs, seq_len, rng) for _ in range(s.mqar_samples)])
            correct = total = 0
            for xb, yb in _batches(x, y, s.batch):
                hit, _ = _scored(model, xb, yb)
                mask = yb != IGNORE
                correct += int((hit & mask).sum())
                total += int(mask.sum())
                first = mask.int().argmax(dim=1)  # the first query of each row
                first_right += int(hit.gather(1, first[:, None]).sum())
                first_total += len(first)
                advance()
            grid[f"pairs={pairs},len={seq_len}"] = round(correct / total, 4)
            correct_all += correct
            total_all += total
    return {"accuracy": round(correct_all / total_all, 4), "first_query_accuracy": round(first_right / first_total, 4), "grid": grid}


def passkey(model: torch.nn.Module, s: EvalSettings, advance: Callable[[], None]) -> dict[str, Any]:
    by_length: dict[str, float] = {}
    for length in s.passkey_lengths:
        rng = np.random.default_rng([s.seed, length])
        x, y = stack([passkey_example(length, rng) for _ in range(s.passkey_samples)])
        right = 0
        for xb, yb in _batches(x, y, s.batch):
            hit, _ = _scored(model, xb, yb)
            mask = yb != IGNORE
            right += int(((hit | ~mask).all(dim=1)).sum())
            advance()
        by_length[f"len={length}"] = round(right / len(x), 4)
    return {"accuracy": round(float(np.mean(list(by_length.values()))), 4), "by_length": by_length}


def count_batches(tasks: tuple[str, ...], s: EvalSettings) -> int:
    n = 0
    per = math.ceil
    if "ppl" in tasks:
        n += per(s.ppl_windows / s.batch)
    if "mqar" in tasks:
        cells = sum(1 for p in s.mqar_pairs for L in s.mqar_seq_lens if L >= 4 * p + 1)
        n += cells * per(s.mqar_samples / s.batch)
    if "passkey" in tasks:
        n += len(s.passkey_lengths) * per(s.passkey_samples / s.batch)
    return n


def evaluate(
    path: str | Path,
    tasks: tuple[str, ...] = TASKS,
    settings: EvalSettings | None = None,
    advance: Callable[[], None] = lambda: None,
) -> EvalResult:
    """Run ``tasks`` on the model at ``path``; ``advance`` is called once per batch (progress)."""
    s = settings or EvalSettings()
    torch.manual_seed(s.seed)
    model, converted = load_for_eval(path)
    result = EvalResult(str(path), converted)
    runners = {"ppl": perplexity, "mqar": mqar, "passkey": passkey}
    for task in tasks:
        result.scores[task] = runners[task](model, s, advance)
    return result
