"""Calibration data for head analysis: token ids ``[samples, seq_len]`` from a file or built in.

Design decisions:
- Three file forms, told apart by suffix: ``.npy`` token ids (read with
  ``allow_pickle=False``; 2-d rows are cut to ``seq_len``, a 1-d stream is cut into rows),
  ``.jsonl`` (one JSON object per line with a ``text`` field) and anything else as plain
  UTF-8 text. Text is tokenized with the checkpoint's own ``tokenizer.json`` (a data file,
  read by the ``tokenizers`` library; no code from the checkpoint runs), or as bytes for a
  byte-level model (vocabulary 256). Rows are consecutive windows of the tokenized stream,
  so the same file and settings always give the same calibration set. (The built-in byte
  set is cut from the running Python's standard library, so it can differ between Python
  versions; pass ``--calib`` for a set that never changes.)
- The built-in default depends on the model: for byte-level models (the shipped example)
  a fixed-seed mix of training-split text, MQAR and passkey sequences from
  ``hydracc.evaluation.tasks`` (never the held-out text ``hydracc eval`` scores on); for any other
  vocabulary, the same mix in the model's own tokens: training-split text through its
  ``tokenizer.json`` and the recall and passkey probes of ``evaluation.probes`` (ordinary ids,
  special tokens left out), or, without a tokenizer, repeated spans of ordinary ids in place
  of text. The description says which was used, and recommends ``--calib`` with in-domain
  text for real models.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hydracc.errors import HydraError
from hydracc.evaluation.tasks import VOCAB_SIZE, mqar_example, passkey_example, stdlib_corpus

DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 256
DEFAULT_SEED = 7
"""Seed of the built-in calibration set (``hydracc eval`` uses others)."""
PASSKEY_MIN_LEN = 96


class CalibrationError(HydraError):
    """Calibration data that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class Calibration:
    tokens: np.ndarray
    """``[samples, seq_len]`` int64 token ids."""
    source: str

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": self.samples, "seq_len": self.seq_len}


def physical_memory() -> int | None:
    """This machine's memory in bytes (``None`` where the system does not say)."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_calibration_size(rows: int, seq_len: int, *, hidden: int | None, layers: int | None, element_bytes: int,
                           memory: int | None = None, what: str = "calibration rows (--calib-samples; --distill-samples "
                           "with --distill)") -> None:
    """Refuse ``rows`` x ``seq_len`` calibration tokens the analysis cannot hold, before any row is made.

    The analysis (and ``--distill``) keeps every row's hidden state entering each layer and the LM head, ``hidden``
    values of ``element_bytes`` each per token, for its backward sweeps and re-measurements: ``layers + 1`` of them
    per token, all at once. When that alone passes ``memory`` (default: this machine's) the run could only end in
    running out of memory, after the work, so it is refused now with the limit.
    """
    memory = physical_memory() if memory is None else memory
    if not hidden or not layers or memory is None or rows < 1 or seq_len < 1:
        return
    from hydracc import distributed

    per_token = int(hidden) * (int(layers) + 1) * max(1, int(element_bytes))
    tokens = -(-int(rows) // distributed.world_size()) * int(seq_len)  # under torch.distributed a process holds its share
    if tokens * per_token <= memory:
        return
    most = memory // per_token
    raise CalibrationError(
        f"{rows} {what} of {seq_len} tokens are more than the analysis can hold: it keeps every row's hidden state at "
        f"each of the model's {layers} layers and its LM head ({hidden} values x {element_bytes} bytes, "
        f"{_human(per_token)} per token), {_human(tokens * per_token)} for {tokens} tokens, and this machine has "
        f"{_human(memory)} of memory; at most {most} calibration tokens fit (rows x --seq-len)",
        hint=f"use at most {max(most // seq_len, 0)} rows at --seq-len {seq_len} (typical: 16 to 512 rows)",
    )


def local_rows(calibration: Calibration) -> Calibration:
    """This process's calibration rows under torch.distributed (``distributed.my_rows``); all of them alone."""
    from hydracc import distributed

    if distributed.world_size() == 1:
        return calibration
    rows = distributed.my_rows(calibration.samples)
    return Calibration(np.ascontiguousarray(calibration.tokens[rows]), calibration.source)


def _rows_from_stream(stream: np.ndarray, samples: int, seq_len: int, where: str) -> np.ndarray:
    rows = len(stream) // seq_len
    if rows < 1:
        raise CalibrationError(
            f"{where} has {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}",
            hint="give more text or a smaller --seq-len",
        )
    rows = min(rows, samples)
    return stream[: rows * seq_len].reshape(rows, seq_len)


def _tokenize(texts: list[str], vocab_size: int, root: Path | None, where: str) -> np.ndarray:
    tokenizer_file = root / "tokenizer.json" if root is not None else None
    if tokenizer_file is not None and tokenizer_file.is_file() and vocab_size != VOCAB_SIZE:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_file))
        ids: list[int] = []
        for text in texts:
            ids.extend(tok.encode(text, add_special_tokens=False).ids)
        return np.asarray(ids, dtype=np.int64)
    if vocab_size == VOCAB_SIZE:
        return np.frombuffer("\n\n".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int64)
    raise CalibrationError(
        f"cannot tokenize {where}: the checkpoint has no tokenizer.json and its vocabulary ({vocab_size}) is not bytes",
        hint="give token ids instead: --calib ids.npy (an integer array [samples, seq_len] or a 1-d stream)",
    )


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"))


def check_calibration_file(path: str | os.PathLike[str]) -> None:
    """Refuse a ``--calib`` path that is not a regular file, saying what it is: missing, a folder, a device
    (``/dev/zero`` would be read without end), a pipe or a socket."""
    p = Path(path)
    hint = "--calib takes a regular file: plain text, JSON lines (.jsonl) or token ids (.npy)"
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        broken = os.path.islink(p)
        raise CalibrationError(f"calibration file {p} " + ("is a symbolic link to a file that does not exist" if broken
                                                           else "does not exist"), hint=hint) from None
    except OSError as exc:
        raise CalibrationError(f"calibration file {p} cannot be read: {exc.strerror or exc}", hint=hint) from exc
    if stat.S_ISREG(mode):
        return
    what = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise CalibrationError(f"calibration file {p} is {what}, not a regular file", hint=hint)


def load_calibration(
    path: str | Path, *, vocab_size: int, samples: int, seq_len: int, checkpoint_root: Path | None = None
) -> Calibration:
    """Read ``--calib FILE`` into at most ``samples`` rows of ``seq_len`` tokens."""
    p = Path(path)
    check_calibration_file(p)
    where = f"calibration file {p}"
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CalibrationError(f"{where} is not a readable .npy array: {exc}") from exc
        if not np.issubdtype(arr.dtype, np.integer):
            raise CalibrationError(f"{where} holds {arr.dtype}, not integer token ids")
        if arr.ndim == 2:
            if arr.shape[1] < seq_len:
                raise CalibrationError(f"{where} has rows of {arr.shape[1]} tokens, shorter than --seq-len {seq_len}")
            tokens = arr[:samples, :seq_len].astype(np.int64)
        elif arr.ndim == 1:
            tokens = _rows_from_stream(arr.astype(np.int64), samples, seq_len, where)
        else:
            raise CalibrationError(f"{where} has shape {arr.shape}; expected [samples, seq_len] or a 1-d token stream")
    else:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{where} is not UTF-8 text (for token ids use a .npy file)") from exc
        if p.suffix == ".jsonl":
            texts = []
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CalibrationError(f"{where}, line {n}: not valid JSON ({exc.msg})") from exc
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise CalibrationError(f"{where}, line {n}: expected an object with a string \"text\" field")
                texts.append(obj["text"])
        else:
            texts = [text]
        tokens = _rows_from_stream(_tokenize(texts, vocab_size, checkpoint_root, where), samples, seq_len, where)
    if tokens.shape[0] == 0:
        raise CalibrationError(f"{where} holds no calibration rows")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise CalibrationError(f"{where} has token ids outside the model's vocabulary [0, {vocab_size})")
    return Calibration(np.ascontiguousarray(tokens), str(p))


def default_calibration(*, vocab_size: int, samples: int, seq_len: int, seed: int = DEFAULT_SEED,
                        space: Any = None) -> Calibration:
    """The built-in calibration set for a model with ``vocab_size`` tokens (see module docstring).

    ``space``: the model's ``evaluation.probes.TokenSpace`` (its tokenizer and ordinary ids); built
    from ``vocab_size`` alone (ids only) when not given."""
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    if vocab_size == VOCAB_SIZE:
        corpus = stdlib_corpus()
        pairs = min(16, (seq_len - 1) // 8)
        for i in range(samples):
            kind = i % 4
            if kind == 1 and pairs >= 1:
                rows.append(mqar_example(pairs, seq_len, rng)[0])
            elif kind == 3 and seq_len >= PASSKEY_MIN_LEN:
                rows.append(passkey_example(seq_len, rng)[0])
            else:  # text: half the rows, and all of them when the rows are too short for the tasks
                start = int(rng.integers(0, len(corpus.train) - seq_len))
                rows.append(corpus.train[start : start + seq_len])
        source = "built-in: standard-library text (training split), MQAR and passkey sequences (byte level)"
    else:
        from hydracc.evaluation.probes import ProbeError, TokenSpace, passkey_probe, recall_probe

        space = space if space is not None else TokenSpace(vocab_size)
        text = None
        if space.tokenizer is not None:  # training-split text in the model's own tokens
            corpus = stdlib_corpus().train
            text = space.encode(bytes(corpus[: 8 * samples * seq_len].astype(np.uint8)).decode("utf-8", errors="ignore"))
            if len(text) <= seq_len:
                text = None
        pairs = max(1, min(16, seq_len // 16))
        for i in range(samples):
            kind = i % 4
            row = None
            try:
                if kind == 1:
                    row = recall_probe(space, pairs, seq_len, rng)[0]
                elif kind == 3:
                    row = passkey_probe(space, seq_len, rng)[0]
            except ProbeError:  # a vocabulary or a row too small for the probe: text or copying instead
                row = None
            if row is None and text is not None:
                start = int(rng.integers(0, len(text) - seq_len))
                row = text[start : start + seq_len]
            if row is None:  # ids only: a random span of ordinary ids, then the same span again (copying)
                pool = space.pool if space.pool is not None and len(space.pool) else (
                    np.arange(vocab_size // 4, max(vocab_size // 4 + 1, 3 * vocab_size // 4)))
                row = rng.choice(pool, size=seq_len)
                span = max(1, seq_len // 2)
                row[seq_len - span :] = row[:span]
            rows.append(np.asarray(row, dtype=np.int64))
        what = "standard-library text through the checkpoint's tokenizer.json" if text is not None else (
            "repeated spans of ordinary ids")
        source = (f"built-in: {what}, key-value recall and passkey probes in the model's own tokens (use --calib for "
                  "in-domain text)")
    return Calibration(np.stack(rows).astype(np.int64), source)
