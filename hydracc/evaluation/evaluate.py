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
- Works on any causal LM: an original checkpoint (run with SDPA) or a converted one
  (``hydracc.load``), which one decided by the ``hydra`` config section. Byte-level models get
  the byte tasks they were trained on; other vocabularies the same tasks in their own tokens
  (``probes``: text through their tokenizer, recall and passkey from ordinary ids), or
  perplexity on ``calib`` rows.
- Models with a real tokenizer (``TokenSpace.text``: a tokenizer.json and a vocabulary of 4,096 or
  more) get the text tasks by default (``text_eval.TEXT_TASKS``): perplexity on held-out prose,
  passkey and key-value lookup answered by generation, copying of a repeated span; the tasks above
  stay available by name. ``original`` (the original's ``--json`` report, or its folder) limits a
  converted model to the recall cells the original passes.
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
from hydracc.evaluation.probes import TokenSpace, heldout_ids, passkey_probe, recall_probe, token_space
from hydracc.evaluation.tasks import IGNORE, stack, stdlib_corpus
from hydracc.evaluation.text_eval import (
    TEXT_TASKS,
    TextSettings,
    copy_task,
    count_text_steps,
    generated_task,
    prose_perplexity,
)
from hydracc.evaluation.text_tasks import TextTokenizer

TASKS = ("ppl", "mqar", "passkey")
"""The built-in tasks of byte-level and id-only models; ``recall`` (a file of the model's own probes) runs when one is given."""
ALL_TASKS = TASKS + TEXT_TASKS + ("recall",)


@dataclass(frozen=True)
class EvalSettings:
    ppl_windows: int = 64
    ppl_seq_len: int = 128
    mqar_pairs: tuple[int, ...] = (4, 8, 16)
    mqar_seq_lens: tuple[int, ...] = (128, 256, 512, 1024)
    """512 and 1024: 8x and 16x the default streaming window, where a window cannot hold the pairs."""
    mqar_samples: int = 64
    passkey_lengths: tuple[int, ...] = (96, 128, 256, 512, 1024)
    passkey_samples: int = 32
    batch: int = 16
    seed: int = 1234
    text: TextSettings = TextSettings()
    """The text tasks of models with a real tokenizer (``text_eval``)."""


@dataclass
class EvalResult:
    model: str
    converted: bool
    scores: dict[str, Any] = field(default_factory=dict)
    tokens: str = "bytes"
    """How the data was written in the model's tokens (``TokenSpace.describe``)."""

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "converted": self.converted, "tokens": self.tokens, **self.scores}


def load_for_eval(path: str | Path, device: str | torch.device = "cpu", *,
                  allow_nonfinite: bool = False, check_hashes: bool = True) -> tuple[torch.nn.Module, bool, TokenSpace]:
    """The model at ``path`` (a checkpoint folder or a file in one), whether it is converted, and its tokens."""
    from hydracc.frontend.checkpoint import open_checkpoint
    from hydracc.runtime.loader import from_pretrained, load

    ck = open_checkpoint(path)  # the path, config and files, before transformers touches them
    ck.close()
    root, config = ck.root, ck.config
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise HydraError(f"{root}: config.json has no usable vocab_size ({vocab!r})")
    space = token_space(root, vocab)
    if "hydra" in config:
        return load(root, device=device, allow_nonfinite=allow_nonfinite, check_hashes=check_hashes), True, space
    model = from_pretrained(root, config, allow_nonfinite=allow_nonfinite, attn_implementation="sdpa")
    return model.to(device).eval(), False, space


def _batches(x: np.ndarray, y: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield torch.from_numpy(x[i : i + size]), torch.from_numpy(y[i : i + size])


@torch.no_grad()
def _scored(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax == label, nll) at every labelled position; both ``[B, T]``, on the CPU."""
    device = next(model.parameters()).device
    logits = model(input_ids=x.to(device)).logits.float().cpu()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="none")
    return logits.argmax(-1) == y, nll.reshape(y.shape)


def _text_windows(space: TokenSpace, s: EvalSettings, calib: np.ndarray | None) -> np.ndarray:
    """``[windows, ppl_seq_len + 1]`` token windows: from ``calib`` rows, else from held-out text."""
    rng = np.random.default_rng(s.seed)
    if calib is not None:
        if calib.shape[1] < s.ppl_seq_len + 1:
            raise HydraError(f"--calib rows have {calib.shape[1]} tokens; perplexity needs {s.ppl_seq_len + 1}")
        return calib[: s.ppl_windows, : s.ppl_seq_len + 1]
    text = stdlib_corpus().heldout if space.bytes else heldout_ids(space, 4 * s.ppl_windows * (s.ppl_seq_len + 1))
    if len(text) < s.ppl_seq_len + 2:
        raise HydraError("the held-out text is too short in this model's tokens", hint="give --calib data")
    starts = rng.integers(0, len(text) - s.ppl_seq_len - 1, size=s.ppl_windows)
    return np.stack([text[a : a + s.ppl_seq_len + 1] for a in starts])


def perplexity(model: torch.nn.Module, s: EvalSettings, advance: Callable[[], None], space: TokenSpace,
               calib: np.ndarray | None = None) -> dict[str, Any]:
    windows = _text_windows(space, s, calib)
    total, count = 0.0, 0
    for x, y in _batches(windows[:, :-1], windows[:, 1:].copy(), s.batch):
        _, nll = _scored(model, x, y)
        total += float(nll.sum())
        count += nll.numel()
        advance()
    mean = total / count
    unit = "bits_per_byte" if space.bytes and calib is None else "bits_per_token"
    return {"ppl": round(math.exp(mean), 4), unit: round(mean / math.log(2), 4), "tokens": count,
            "text": "--calib rows" if calib is not None else "held-out standard-library text"}


def _recall_counts(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, s: EvalSettings,
                   advance: Callable[[], None]) -> tuple[int, int, int, int]:
    """Right and scored answers; right first answers and rows with an answer (the shortcut check)."""
    right = total = first_right = rows = 0
    for xb, yb in _batches(x, y, s.batch):
        hit, _ = _scored(model, xb, yb)
        mask = yb != IGNORE
        right += int((hit & mask).sum())
        total += int(mask.sum())
        scored = mask.any(1)
        first = mask.int().argmax(dim=1)  # the first answer of each row
        first_right += int(hit.gather(1, first[:, None])[:, 0][scored].sum())
        rows += int(scored.sum())
        advance()
    return right, total, first_right, rows


def mqar(model: torch.nn.Module, s: EvalSettings, advance: Callable[[], None], space: TokenSpace) -> dict[str, Any]:
    grid: dict[str, float] = {}
    correct_all = total_all = first_right = first_total = 0
    per_length: dict[int, list[int]] = {}
    for pairs in s.mqar_pairs:
        for seq_len in s.mqar_seq_lens:
            if seq_len < 4 * pairs + 1:
                continue
            rng = np.random.default_rng([s.seed, pairs, seq_len])
            x, y = stack([recall_probe(space, pairs, seq_len, rng) for _ in range(s.mqar_samples)])
            correct, total, right, rows = _recall_counts(model, x, y, s, advance)
            first_right, first_total = first_right + right, first_total + rows
            grid[f"pairs={pairs},len={seq_len}"] = round(correct / total, 4)
            correct_all += correct
            total_all += total
            counts = per_length.setdefault(seq_len, [0, 0])
            counts[0] += correct
            counts[1] += total
    by_length = {f"len={length}": round(c / t, 4) for length, (c, t) in sorted(per_length.items())}
    return {"accuracy": round(correct_all / total_all, 4), "first_query_accuracy": round(first_right / first_total, 4),
            "by_length": by_length, "grid": grid}


def passkey(model: torch.nn.Module, s: EvalSettings, advance: Callable[[], None], space: TokenSpace) -> dict[str, Any]:
    by_length: dict[str, float] = {}
    for length in s.passkey_lengths:
        rng = np.random.default_rng([s.seed, length])
        x, y = stack([passkey_probe(space, length, rng) for _ in range(s.passkey_samples)])
        right = 0
        for xb, yb in _batches(x, y, s.batch):
            hit, _ = _scored(model, xb, yb)
            mask = yb != IGNORE
            right += int(((hit | ~mask).all(dim=1)).sum())
            advance()
        by_length[f"len={length}"] = round(right / len(x), 4)
    return {"accuracy": round(float(np.mean(list(by_length.values()))), 4), "by_length": by_length}


def load_recall_probes(path: str | Path, vocab_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A model's own recall probes from ``path``: an ``.npz`` with ``ids_NAME`` and ``labels_NAME`` pairs of
    integer arrays ``[rows, T]`` (labels ``-100`` except where the next token is scored), one set per NAME.
    Read with ``allow_pickle=False``."""
    p = Path(path)
    hint = "write it with numpy.savez(path, ids_512=ids, labels_512=labels) (integer arrays [rows, tokens])"
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise HydraError(f"--recall {p}: no such file", hint=hint) from None
    except Exception as exc:  # zipfile, pickle refusal, bad headers
        raise HydraError(f"--recall {p}: not a readable .npz of integer arrays ({exc})", hint=hint) from None
    names = sorted(k.removeprefix("ids_") for k in arrays if k.startswith("ids_"))
    if not names:
        raise HydraError(f"--recall {p}: no ids_NAME arrays (found {', '.join(sorted(arrays)) or 'nothing'})", hint=hint)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        ids, labels = arrays[f"ids_{name}"], arrays.get(f"labels_{name}")
        where = f"--recall {p}, set {name!r}"
        if labels is None:
            raise HydraError(f"{where}: ids_{name} has no labels_{name} beside it", hint=hint)
        if ids.ndim != 2 or ids.shape != labels.shape or not np.issubdtype(ids.dtype, np.integer) or not np.issubdtype(
                labels.dtype, np.integer):
            raise HydraError(f"{where}: ids {ids.dtype}{list(ids.shape)} and labels {labels.dtype}{list(labels.shape)} "
                             "must be integer arrays of one shape [rows, tokens]", hint=hint)
        scored = labels != IGNORE
        if not scored.any():
            raise HydraError(f"{where}: no scored position (every label is {IGNORE})", hint=hint)
        if ids.min() < 0 or ids.max() >= vocab_size or labels[scored].min() < 0 or labels[scored].max() >= vocab_size:
            raise HydraError(f"{where}: token ids outside the model's vocabulary (0..{vocab_size - 1})", hint=hint)
        out[name] = (ids.astype(np.int64), labels.astype(np.int64))
    return out


def recall_file(model: torch.nn.Module, s: EvalSettings, advance: Callable[[], None],
                probes: dict[str, tuple[np.ndarray, np.ndarray]], source: str) -> dict[str, Any]:
    """Accuracy on a model's own recall probes (``load_recall_probes``): per set, and each row's first answer alone."""
    by_set: dict[str, float] = {}
    right_all = total_all = first_right = first_total = 0
    for name, (x, y) in probes.items():
        right, total, first, rows = _recall_counts(model, x, y, s, advance)
        first_right, first_total = first_right + first, first_total + rows
        by_set[f"{name} (len={x.shape[1]})"] = round(right / total, 4)
        right_all, total_all = right_all + right, total_all + total
    return {"accuracy": round(right_all / total_all, 4), "first_answer_accuracy": round(first_right / max(first_total, 1), 4),
            "by_set": by_set, "file": source}


def count_batches(tasks: tuple[str, ...], s: EvalSettings, recall_rows: tuple[int, ...] = ()) -> int:
    n = 0
    per = math.ceil
    if "ppl" in tasks:
        n += per(s.ppl_windows / s.batch)
    if "mqar" in tasks:
        cells = sum(1 for p in s.mqar_pairs for L in s.mqar_seq_lens if L >= 4 * p + 1)
        n += cells * per(s.mqar_samples / s.batch)
    if "passkey" in tasks:
        n += len(s.passkey_lengths) * per(s.passkey_samples / s.batch)
    if "recall" in tasks:
        n += sum(per(r / s.batch) for r in recall_rows)
    return n + count_text_steps(tasks, s.text)


def default_tasks(path: str | Path, recall: bool = False) -> tuple[str, ...]:
    """The tasks ``evaluate`` runs on the model at ``path`` by default: the text tasks for a real
    tokenizer, else the probe tasks (and ``recall`` when a probe file is given)."""
    from hydracc.frontend.checkpoint import open_checkpoint

    ck = open_checkpoint(path)
    ck.close()
    vocab = ck.config.get("vocab_size")
    text = isinstance(vocab, int) and vocab > 1 and token_space(ck.root, vocab).text
    return (TEXT_TASKS if text else TASKS) + (("recall",) if recall else ())


def load_original_report(original: str | Path | dict[str, Any], tasks: tuple[str, ...], s: EvalSettings,
                         device: str | torch.device) -> dict[str, Any]:
    """The original's scores: a report dict, a ``hydracc eval --json`` file, or a checkpoint folder (evaluated now)."""
    if isinstance(original, dict):
        return original
    p = Path(original)
    if p.is_dir():
        return evaluate(p, tasks, s, device=device).to_json()
    import json

    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise HydraError(f"--original {p}: no such file or folder") from None
    except (OSError, ValueError) as exc:
        raise HydraError(f"--original {p}: not a JSON report ({exc})",
                         hint="write it with: hydracc eval ORIGINAL --json > original.json") from None
    if not isinstance(report, dict) or report.get("converted") is not False:
        raise HydraError(f"--original {p}: not the report of an original model (hydracc eval ORIGINAL --json)")
    return report


def evaluate(
    path: str | Path,
    tasks: tuple[str, ...] | None = None,
    settings: EvalSettings | None = None,
    advance: Callable[[], None] = lambda: None,
    *,
    calib: str | Path | None = None,
    recall: str | Path | None = None,
    original: str | Path | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    allow_nonfinite: bool = False,
    check_hashes: bool = True,
) -> EvalResult:
    """Run ``tasks`` on the model at ``path``; ``advance`` is called once per batch (progress).

    ``calib``: perplexity on these rows (``--calib`` formats) instead of the built-in held-out text.
    ``recall``: the model's own recall probes (``load_recall_probes``), scored as task ``recall``.
    ``tasks``: ``None`` for the model's default tasks (``default_tasks``).
    ``original``: for a converted model, the original's report or folder; text-task cells the
    original fails are then not run (``text_eval``).
    """
    s = settings or EvalSettings()
    torch.manual_seed(s.seed)
    if tasks is None:
        tasks = default_tasks(path)
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise HydraError(f"unknown task {', '.join(unknown)}", hint=f"tasks: {', '.join(ALL_TASKS)}")
    if "recall" in tasks and recall is None:
        raise HydraError("the recall task scores a file of the model's own probes", hint="give --recall FILE.npz")
    model, converted, space = load_for_eval(path, device, allow_nonfinite=allow_nonfinite, check_hashes=check_hashes)
    probes = load_recall_probes(recall, space.vocab_size) if recall is not None and "recall" in tasks else {}
    rows = None
    if calib is not None:
        from hydracc.analysis.calibration import load_calibration

        rows = load_calibration(calib, vocab_size=space.vocab_size, samples=s.ppl_windows, seq_len=s.ppl_seq_len + 1,
                                checkpoint_root=Path(path) if Path(path).is_dir() else Path(path).parent).tokens
    text_tasks = [t for t in tasks if t in TEXT_TASKS]
    if text_tasks and not space.text:
        raise HydraError(f"{', '.join(text_tasks)} need a real tokenizer (a tokenizer.json and a vocabulary of 4,096 "
                         f"or more); this model has {space.describe} and {space.vocab_size} ids",
                         hint=f"its tasks: {', '.join(TASKS)}")
    reference = None
    if original is not None and text_tasks:
        if not converted:
            raise HydraError("--original is for a converted model; this one is an original")
        reference = load_original_report(original, tuple(text_tasks), s, device)
    tok = TextTokenizer(space.tokenizer) if space.text else None
    result = EvalResult(str(path), converted, tokens=space.describe)
    for task in tasks:
        if task == "prose":
            result.scores[task] = prose_perplexity(model, tok, s.text, s.seed, advance)
        elif task in ("passkey_gen", "kv_lookup"):
            result.scores[task] = generated_task(task, model, tok, s.text, s.seed, advance, reference)
        elif task == "copy":
            result.scores[task] = copy_task(model, tok, s.text, s.seed, advance, reference)
        elif task == "ppl":
            result.scores[task] = perplexity(model, s, advance, space, rows)
        elif task == "recall":
            result.scores[task] = recall_file(model, s, advance, probes, Path(recall).name)
        else:
            result.scores[task] = {"mqar": mqar, "passkey": passkey}[task](model, s, advance, space)
    return result
