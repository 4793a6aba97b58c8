"""Scoring the text tasks (``text_tasks``) on a model: prose perplexity, passkey, key-value lookup, copying.

Decisions:
- passkey and kv_lookup are answered by ``model.generate`` (greedy, ``max_new_tokens``), one prompt at
  a time, so a converted model runs with its hybrid cache exactly as ``hydracc generate`` does and
  no padding enters; copy and prose are teacher-forced forward passes.
- Samples per cell shrink with length: ``samples * 1024 / length`` (at least 1), so each cell costs
  about the same; the default (4 at 1k tokens: 4/2/1 passkeys at 1k/2k/4k) runs a 135M model in
  under 10 minutes on 2 CPU cores; ``--samples 16`` for tighter numbers.
- A recall cell the original model fails (below ``FLOOR``) says nothing about a conversion: an
  original's report lists such cells under ``below_floor``; given the original's report
  (``original``: ``hydracc eval ORIGINAL --json`` output), a converted model is scored only on the
  cells the original passes; the others are reported under ``not_judged`` with the reason, and not run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hydracc.evaluation.prose import prose_corpus
from hydracc.evaluation.text_tasks import (
    IGNORE,
    TextTokenizer,
    copy_row,
    first_digits,
    kv_prompt,
    passkey_prompt,
    prose_windows,
)

TEXT_TASKS = ("prose", "passkey_gen", "copy", "kv_lookup")
"""The default tasks of a model with a real tokenizer."""
FLOOR = 0.5
"""A recall cell the original scores below this is not used to judge a converted model."""
_TASK_SEED = {"prose": 1, "passkey_gen": 2, "copy": 3, "kv_lookup": 4}


@dataclass(frozen=True)
class TextSettings:
    prose_windows: int = 8
    prose_seq_len: int = 512
    passkey_lengths: tuple[int, ...] = (1024, 2048, 4096)
    copy_lengths: tuple[int, ...] = (512, 1024, 2048)
    kv_lengths: tuple[int, ...] = (1024, 2048)
    samples: int = 4
    """Samples at 1,024 tokens; ``samples * 1024 / length`` (at least 1) at other lengths."""
    copy_span_words: int = 64
    kv_pairs: int = 6
    max_new_tokens: int = 10
    batch: int = 4

    def samples_at(self, length: int) -> int:
        return max(1, round(self.samples * 1024 / length))

    def lengths(self, task: str) -> tuple[int, ...]:
        return {"passkey_gen": self.passkey_lengths, "copy": self.copy_lengths, "kv_lookup": self.kv_lengths}[task]


def count_text_steps(tasks: tuple[str, ...], ts: TextSettings) -> int:
    n = math.ceil(ts.prose_windows / ts.batch) if "prose" in tasks else 0
    for task in ("passkey_gen", "copy", "kv_lookup"):
        if task in tasks:
            n += sum(ts.samples_at(length) for length in ts.lengths(task))
    return n


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prose_perplexity(model: torch.nn.Module, tok: TextTokenizer, ts: TextSettings, seed: int,
                     advance: Callable[[], None]) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _TASK_SEED["prose"]])
    rows, prefix = prose_windows(tok, ts.prose_windows, ts.prose_seq_len, rng)
    total, count = 0.0, 0
    for i in range(0, len(rows), ts.batch):
        x = torch.from_numpy(rows[i : i + ts.batch])
        logits = model(input_ids=x.to(_device(model))).logits.float().cpu()
        # score every text token the model sees a context for (the first one only after a BOS)
        first = max(prefix - 1, 0)
        lg, y = logits[:, first:-1], x[:, first + 1 :]
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="sum")
        total += float(nll)
        count += y.numel()
        advance()
    mean = total / count
    corpus = prose_corpus()
    return {"ppl": round(math.exp(mean), 4), "bits_per_token": round(mean / math.log(2), 4), "tokens": count,
            "windows": ts.prose_windows, "seq_len": ts.prose_seq_len, "bos": bool(prefix),
            "text": corpus.describe()}


@torch.no_grad()
def _generate(model: torch.nn.Module, ids: np.ndarray, max_new_tokens: int) -> list[int]:
    x = torch.from_numpy(ids)[None].to(_device(model))
    gen = getattr(model, "generation_config", None)
    pad = next((v for v in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)) if v is not None), 0)
    if isinstance(pad, list):
        pad = pad[0]
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    return out[0, x.shape[1] :].tolist()


def _judge(task: str, length: int, original: dict[str, Any] | None) -> str | None:
    """Why the cell is not judged (``None``: judge it)."""
    if original is None:
        return None
    score = original.get(task, {}).get("by_length", {}).get(f"len={length}")
    if score is None:
        return "the original's report has no score for this cell"
    if score < FLOOR:
        return f"the original scores {score:.1%} here, below the {FLOOR:.0%} floor"
    return None


def _summary(task: str, by_length: dict[str, float], extra: dict[str, Any], not_judged: dict[str, str],
             original: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"accuracy": round(float(np.mean(list(by_length.values()))), 4) if by_length else None,
                           "by_length": by_length, **extra}
    if original is None:
        out["below_floor"] = [cell for cell, acc in by_length.items() if acc < FLOOR]
    else:
        out["not_judged"] = not_judged
    return out


def generated_task(task: str, model: torch.nn.Module, tok: TextTokenizer, ts: TextSettings, seed: int,
                   advance: Callable[[], None], original: dict[str, Any] | None = None) -> dict[str, Any]:
    """passkey_gen or kv_lookup: greedy answers, exact match of the first digits generated."""
    build = {"passkey_gen": lambda L, rng: passkey_prompt(tok, L, rng),
             "kv_lookup": lambda L, rng: kv_prompt(tok, L, rng, pairs=ts.kv_pairs)}[task]
    by_length: dict[str, float] = {}
    tokens: dict[str, int] = {}
    samples: dict[str, int] = {}
    not_judged: dict[str, str] = {}
    for length in ts.lengths(task):
        cell = f"len={length}"
        n = ts.samples_at(length)
        why = _judge(task, length, original)
        if why is not None:
            not_judged[cell] = why
            for _ in range(n):
                advance()
            continue
        rng = np.random.default_rng([seed, _TASK_SEED[task], length])
        right = 0
        sizes = []
        for _ in range(n):
            p = build(length, rng)
            sizes.append(len(p.ids))
            answer = tok.decode(_generate(model, p.ids, ts.max_new_tokens))
            right += first_digits(answer) == p.answer
            advance()
        by_length[cell] = round(right / n, 4)
        tokens[cell] = int(np.mean(sizes))
        samples[cell] = n
    extra = {"tokens": tokens, "samples": samples, "scoring": "greedy generation, exact match of the digits"}
    if task == "kv_lookup":
        extra["pairs"] = ts.kv_pairs
    return _summary(task, by_length, extra, not_judged, original)


@torch.no_grad()
def copy_task(model: torch.nn.Module, tok: TextTokenizer, ts: TextSettings, seed: int, advance: Callable[[], None],
              original: dict[str, Any] | None = None) -> dict[str, Any]:
    """A repeated span of random words, teacher-forced: argmax accuracy on the repeat's tokens."""
    by_length: dict[str, float] = {}
    tokens: dict[str, int] = {}
    samples: dict[str, int] = {}
    not_judged: dict[str, str] = {}
    for length in ts.copy_lengths:
        cell = f"len={length}"
        n = ts.samples_at(length)
        why = _judge("copy", length, original)
        if why is not None:
            not_judged[cell] = why
            for _ in range(n):
                advance()
            continue
        rng = np.random.default_rng([seed, _TASK_SEED["copy"], length])
        right = total = 0
        sizes = []
        for _ in range(n):
            x, y = copy_row(tok, length, rng, span_words=ts.copy_span_words)
            sizes.append(len(x))
            logits = model(input_ids=torch.from_numpy(x)[None].to(_device(model))).logits[0].float().cpu()
            yt = torch.from_numpy(y)
            mask = yt != IGNORE
            right += int((logits.argmax(-1)[mask] == yt[mask]).sum())
            total += int(mask.sum())
            advance()
        by_length[cell] = round(right / total, 4)
        tokens[cell] = int(np.mean(sizes))
        samples[cell] = n
    extra = {"tokens": tokens, "samples": samples, "span_words": ts.copy_span_words,
             "scoring": "teacher-forced argmax on the repeated span's tokens"}
    return _summary("copy", by_length, extra, not_judged, original)
