"""Emit stage, writer part: a streamed, atomic, deterministic safetensors checkpoint writer.

Design decisions:
- Everything is written into a hidden temporary folder beside ``out_dir`` (same parent, so the
  same filesystem) and renamed into place only when the ``with`` block ends cleanly; an
  exception removes the temporary folder and leaves ``out_dir`` untouched. With ``force``, an
  existing ``out_dir`` is swapped out only at that last step (and restored if the swap fails).
- Tensors arrive one at a time and are buffered until the next one would push the shard past
  ``max_shard_bytes``; then the shard is saved with ``safetensors.torch.save_file``. Memory is
  bounded by one shard (a single tensor larger than the limit gets a shard of its own).
- Shards are saved under provisional names and renamed at close, when their count is known:
  ``model.safetensors`` alone, or ``model-0000i-of-0000N.safetensors`` plus the
  ``model.safetensors.index.json`` that transformers writes.
- Output is byte-identical for the same tensors in the same order: safetensors orders a file by
  dtype and name, and JSON is written with sorted keys, two-space indent and a final newline.
- Problems with the output location raise ``OutputError`` at construction, before any work.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
import warnings
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch

from hydracc.errors import OutputError
from hydracc.paths import TEMP_NAME_EXTRA, check_name_length, process_running
from hydracc.runtime.integrity import tensor_digest

__all__ = [
    "CheckpointWriter", "check_destination", "hydracc_made",
    "json_safe", "make_temp_folder", "parse_size", "remove_stale_temp_folders", "swap_into_place",
]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""Mode of every written file: what ``open()`` (and so ``save_pretrained``) gives under this umask."""
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: str | int) -> int:
    """Parse a byte size such as ``"5GB"`` (1000-based, like Hugging Face), ``"500MiB"``
    (1024-based), ``"123B"`` or a plain integer; returns a positive number of bytes.

    Units (case-insensitive): B, KB, MB, GB, KiB, MiB, GiB. Raises ``ValueError`` otherwise
    (``TypeError`` for a value that is neither ``int`` nor ``str``).
    """
    if isinstance(value, bool):
        raise TypeError(f"size must be a number of bytes or a string like '5GB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"size must be an int or a string like '5GB', got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse size {value!r}: expected a number followed by one of "
            "B, KB, MB, GB (1000-based) or KiB, MiB, GiB (1024-based), e.g. '5GB' or '500MiB'"
        )
    try:
        n = int(Decimal(m.group(1)) * _UNITS[unit])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"cannot parse size {value!r}") from exc
    if n <= 0:
        raise ValueError(f"size must be at least one byte, got {value!r}")
    return n


class CheckpointWriter:
    """Write a checkpoint folder atomically, one tensor at a time.

    ::

        with CheckpointWriter(out_dir, force=False, max_shard_bytes="5GB") as w:
            for name, tensor in tensors:
                w.add(name, tensor)
            w.write_json("config.json", config)
            w.copy_file(tokenizer_path, "tokenizer.json")
        w.written_files()

    Tensors handed to ``add`` are kept by reference until their shard is saved: do not
    modify them in place afterwards.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        force: bool = False,
        max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        self.out_dir = Path(os.fspath(out_dir)).expanduser().absolute()
        self.force = force
        self.max_shard_bytes = parse_size(max_shard_bytes)
        check_destination(self.out_dir, force)

        self._tmp: Path | None = None
        self._state = "new"  # new -> open -> closed | aborted
        self._names: set[str] = set()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()
        self._shards: list[tuple[Path, list[str]]] = []  # provisional path, tensor names
        self._total_size = 0
        self._side_files: list[str] = []
        self._written: list[Path] = []
        self.digests: dict[str, str] = {}
        """sha256 of every tensor added (``runtime.integrity.tensor_digest``), for the converted config."""

    # -- context manager --------------------------------------------------------------
    def __enter__(self) -> Self:
        self._ensure_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- adding content ---------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; saves the current shard first if ``tensor`` would overflow it."""
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}: it was already added")
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            raise ValueError(f"tensor {name!r} has no data to save ({tensor.layout}, {tensor.device})")
        self._ensure_open()

        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        storage = t.untyped_storage()
        if (
            not t.is_contiguous()
            or t.storage_offset() != 0
            or storage.nbytes() != t.nbytes
            or (t.nbytes and storage.data_ptr() in self._buffer_storages)
        ):
            # a view of a bigger storage or one shared with a buffered tensor: safetensors
            # refuses shared storage, and keeping the big storage alive would cost memory
            t = t.clone(memory_format=torch.contiguous_format)
            storage = t.untyped_storage()

        if self._buffer and self._buffer_bytes + t.nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self.digests[name] = tensor_digest(t)
        self._buffer[name] = t
        self._buffer_bytes += t.nbytes
        self._total_size += t.nbytes
        if t.nbytes:
            self._buffer_storages.add(storage.data_ptr())

    def write_json(self, name: str, obj: Any) -> Path:
        """Write a small JSON file (sorted keys, two-space indent, final newline; NaN and infinity as null)."""
        dest = self._side_path(name)
        text = json.dumps(json_safe(obj), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
        try:
            dest.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {dest}: {exc}") from exc
        return self.out_dir / name

    def write_text(self, name: str, text: str) -> Path:
        """Write a small UTF-8 text file (a model card, say)."""
        dest = self._side_path(name)
        try:
            dest.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {dest}: {exc}") from exc
        return self.out_dir / name

    def copy_file(self, src: str | os.PathLike[str], name: str | None = None) -> Path:
        """Copy a side file (tokenizer, generation config, ...) verbatim into the output."""
        src_path = Path(os.fspath(src))
        if not src_path.is_file():
            raise OutputError(
                f"cannot copy {src_path} into the output: it is not a file",
                hint="check the path of the side file",
            )
        dest = self._side_path(name if name is not None else src_path.name)
        try:
            shutil.copyfile(src_path, dest)
        except OSError as exc:
            raise OutputError(f"cannot copy {src_path} to {dest}: {exc}") from exc
        return self.out_dir / dest.name

    # -- finishing --------------------------------------------------------------------
    def close(self) -> None:
        """Save the last shard, name the shards, write the index, move the folder into place."""
        if self._state == "closed":
            return
        if self._state == "aborted":
            raise RuntimeError("the writer was aborted; nothing was written")
        self._ensure_open()
        assert self._tmp is not None
        try:
            if self._buffer:
                self._flush()
            final = self._name_shards()
            for p in self._tmp.iterdir():
                _fsync_file(p)
            (self._tmp / OWNER_MARKER).unlink()  # only now: a run killed while syncing leaves a folder the next run removes
            _fsync_dir(self._tmp)
            self._swap_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        self._written = [self.out_dir / n for n in final] + [self.out_dir / n for n in self._side_files]

    def abort(self) -> None:
        """Discard everything written so far; ``out_dir`` is left as it was."""
        if self._state == "closed":
            return
        self._state = "aborted"
        self._buffer.clear()
        self._buffer_storages.clear()
        if self._tmp is not None and self._tmp.exists():
            shutil.rmtree(self._tmp, ignore_errors=True)

    def written_files(self) -> list[Path]:
        """Final paths of everything written (shards, index, side files); after ``close``."""
        if self._state != "closed":
            raise RuntimeError("written_files() is available only after the writer closed")
        return list(self._written)

    # -- internals --------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if self._state == "open":
            return
        if self._state != "new":
            raise RuntimeError(f"the writer is {self._state}; start a new CheckpointWriter")
        self._tmp = make_temp_folder(self.out_dir)
        self._state = "open"

    def _side_path(self, name: str) -> Path:
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"side file name {name!r} must be a plain file name")
        if name in (SINGLE_NAME, INDEX_NAME) or _SHARD_RE.match(name):
            raise ValueError(f"{name!r} is reserved for the weights written by add()")
        if name in self._side_files:
            raise ValueError(f"side file {name!r} was already written")
        self._ensure_open()
        assert self._tmp is not None
        self._side_files.append(name)
        return self._tmp / name

    def _flush(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        assert self._tmp is not None
        path = self._tmp / f".shard-{len(self._shards):05d}.partial"
        try:
            save_file(self._buffer, path, metadata={"format": "pt"})
            os.chmod(path, FILE_MODE)  # safetensors writes 0o600; save_pretrained's files follow the umask
        except (OSError, SafetensorError) as exc:  # a full disk comes back as SafetensorError
            raise OutputError(f"cannot write shard {path}: {exc}", hint="check the free space and permissions of the output folder") from exc
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0
        self._buffer_storages = set()

    def _name_shards(self) -> list[str]:
        assert self._tmp is not None
        n = len(self._shards)
        if n == 0:
            return []
        if n == 1:
            self._shards[0][0].rename(self._tmp / SINGLE_NAME)
            return [SINGLE_NAME]
        names: list[str] = []
        weight_map: dict[str, str] = {}
        for i, (path, tensor_names) in enumerate(self._shards, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self._tmp / fname)
            names.append(fname)
            weight_map.update(dict.fromkeys(tensor_names, fname))
        index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (self._tmp / INDEX_NAME).write_text(text, encoding="utf-8")
        return [*names, INDEX_NAME]

    def _swap_into_place(self) -> None:
        assert self._tmp is not None
        swap_into_place(self._tmp, self.out_dir, force=self.force)


SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files a conversion copies verbatim from the input folder when present (tokenizer and generation settings)."""
_OUR_NAMES = re.compile(
    r"^(config\.json|README\.md|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json"
    r"|(prefill|decode)\.onnx(\.data)?|export\.json|" + "|".join(re.escape(n) for n in SIDE_FILES) + r")$"
)
"""Every file name hydracc writes into an output folder (a converted checkpoint, an ONNX export)."""


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that hydracc does not write (an ``onnx`` export inside a converted folder is ours)."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and not entry.is_symlink() and _OUR_NAMES.match(entry.name):
            continue
        if entry.name == "onnx" and entry.is_dir() and not entry.is_symlink() and hydracc_made(entry):
            continue
        out.append(entry.name)
    return out


def hydracc_made(folder: Path) -> bool:
    """Whether ``folder`` is something ``--force`` may replace: empty, or an output hydracc wrote
    that holds nothing else.

    hydracc's outputs are a converted checkpoint (``config.json`` with a ``hydra`` section) and an
    ONNX export (``export.json`` with ``"format": "hydracc-onnx"``), holding only the files hydracc
    writes (``foreign_entries``). Anything else is the user's.
    """
    try:
        if not any(folder.iterdir()):
            return True
        if foreign_entries(folder):
            return False
    except OSError:
        return False
    for name, key, value in (("config.json", "hydra", None), ("export.json", "format", "hydracc-onnx")):
        try:
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and key in doc and (value is None or doc[key] == value):
            return True
    return False


def check_destination(out: Path, force: bool) -> None:
    """Refuse an output path before any work: a name too long for its filesystem (with the temporary folder's
    suffix), a file, an existing folder without ``force``, a folder hydracc did not write (even with ``force``),
    the root, the home or current folder, or a parent that is missing or not writable."""
    check_name_length(out, "output", extra=TEMP_NAME_EXTRA)
    parent = out.parent
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"output path {out} exists and is a file, not a folder",
            hint="choose a folder path for the output",
        )
    if out.is_dir():
        if not force:
            raise OutputError(
                f"output folder {out} already exists",
                hint="pass --force to replace it (it is replaced only once the new output is "
                "complete), or choose another path",
            )
        resolved = out.resolve()
        home = Path.home().resolve()
        cwd = Path.cwd().resolve()
        if resolved == Path(resolved.anchor) or resolved == home or cwd.is_relative_to(resolved):
            raise OutputError(
                f"refusing to replace {out}: it is the filesystem root, the home folder or contains the current folder",
                hint="write the output to a dedicated folder",
            )
        if not hydracc_made(out):
            try:
                foreign = foreign_entries(out)
            except OSError:
                foreign = []
            what = (f"hydracc did not write it all ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''} "
                    f"{'is' if len(foreign) == 1 else 'are'} not hydracc's)"
                    if foreign else "it is not empty and hydracc did not write it (no converted config.json or ONNX export.json in it)")
            raise OutputError(
                f"refusing to replace {out}: {what}",
                hint="--force only replaces hydracc's own outputs: move your files out, choose another path, "
                "or remove the folder yourself",
            )
    if not parent.is_dir():
        raise OutputError(
            f"cannot write {out}: the parent folder {parent} does not exist",
            hint=f"create {parent} first, or choose another output path",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {out}: the parent folder {parent} is not writable",
            hint="choose an output path in a folder you can write to",
        )


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None``, so that it dumps as strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


OWNER_MARKER = ".hydracc-owner.json"
"""Inside every temporary folder while it is written: the process that made it (removed before the rename)."""


def make_temp_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` (same filesystem) marked with this process; stale ones go first.

    The folder honours the umask, unlike ``tempfile.mkdtemp`` (0o700).
    """
    remove_stale_temp_folders(out)
    while True:
        tmp = out.parent / f".{out.name}.hydracc-tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create a temporary folder in {out.parent}: {exc}") from exc
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    (tmp / OWNER_MARKER).write_text(json.dumps(owner) + "\n", encoding="utf-8")
    return tmp


def remove_stale_temp_folders(out: Path) -> list[Path]:
    """Remove the temporary folders an earlier run for ``out`` left (killed, say) whose process is gone.

    Only folders named like hydracc's and carrying its marker are touched, and only when the marker
    names a process on this machine that no longer runs; a folder whose process still runs is kept.
    """
    removed: list[Path] = []
    try:
        candidates = sorted(out.parent.glob(f".{glob.escape(out.name)}.hydracc-tmp-*"))
    except OSError:
        return removed
    for folder in candidates:
        if folder.is_dir() and not folder.is_symlink() and _owner_is_gone(folder / OWNER_MARKER):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _owner_is_gone(marker: Path) -> bool:
    try:
        owner = json.loads(marker.read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no marker of ours: not ours to remove
    if pid <= 0 or pid == os.getpid():
        return False
    return not process_running(pid, host)


def swap_into_place(tmp: Path, out: Path, *, force: bool) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` (checked again: see
    :func:`check_destination`) is moved aside first, put back if the rename fails, and deleted last."""
    if not (out.exists() or out.is_symlink()):
        try:
            os.rename(tmp, out)
        except OSError as exc:
            raise OutputError(f"cannot move the output into place at {out}: {exc}") from exc
        _fsync_dir(out.parent)
        return
    if not force:
        raise OutputError(
            f"{out} appeared while the output was being written",
            hint="pass --force to replace it, or choose another output path",
        )
    check_destination(out, force=True)
    aside = out.parent / f".{out.name}.hydracc-old-{secrets.token_hex(4)}"
    try:
        os.rename(out, aside)
    except OSError as exc:
        raise OutputError(f"cannot move the old {out} aside: {exc}") from exc
    try:
        os.rename(tmp, out)
    except BaseException as exc:
        try:
            os.rename(aside, out)  # put the old output back
        except OSError as exc2:
            raise OutputError(
                f"cannot move the output into place at {out} ({exc}), and the old "
                f"output could not be moved back from {aside} ({exc2})",
                hint=f"rename {aside} to {out} by hand",
            ) from exc
        if isinstance(exc, OSError):
            raise OutputError(f"cannot move the output into place at {out}: {exc}") from exc
        raise
    _fsync_dir(out.parent)
    try:
        if aside.is_symlink():
            aside.unlink()
        else:
            shutil.rmtree(aside)
    except OSError as exc:
        warnings.warn(
            f"the new output is in place at {out}, but the old one could not be deleted from {aside}: {exc}",
            stacklevel=3,
        )


def _fsync_file(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
