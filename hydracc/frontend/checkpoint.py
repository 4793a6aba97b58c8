"""Load stage: open a Hugging Face-format safetensors checkpoint lazily and validate it up front.

Design decisions:
- Safetensors only. Pickled checkpoints (``.bin``, ``.pt``, ...) are refused, never unpickled,
  and nothing from the checkpoint folder is ever executed.
- Every file's header (8-byte little-endian length + JSON) is parsed by hand in
  ``open_checkpoint``: dtypes, shapes, byte offsets against the file size, duplicate names
  across shards and the index are all checked there, reading headers only, so a truncated,
  corrupt or inconsistent checkpoint fails in milliseconds, not halfway through a conversion.
- Tensor data is read one tensor at a time with a positioned read at the offset the header
  gives (no memory map, so dropped tensors free their memory and resident memory does not grow
  with the model); file handles are cached per file and released by ``close()``.
- Only float32, bfloat16 and float16 tensors are accepted; quantized or integer weights are
  rejected at open time with the tensor named.
- Every user-facing failure is a ``CheckpointError`` saying what is wrong, where, and a hint.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch

from hydracc.errors import CheckpointError
from hydracc.paths import check_name_length

__all__ = ["SUPPORTED_DTYPES", "Checkpoint", "TensorInfo", "open_checkpoint"]

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_CHUNK = 1 << 20

# safetensors dtype tag -> (bits per element, torch dtype or None when hydracc refuses it)
_ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F32": (32, torch.float32),
    "BF16": (16, torch.bfloat16),
    "F16": (16, torch.float16),
    "F64": (64, None),
    "I64": (64, None),
    "U64": (64, None),
    "I32": (32, None),
    "U32": (32, None),
    "I16": (16, None),
    "U16": (16, None),
    "I8": (8, None),
    "U8": (8, None),
    "BOOL": (8, None),
    "F8_E4M3": (8, None),
    "F8_E5M2": (8, None),
    "F8_E8M0": (8, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "F4": (4, None),
    "C64": (64, None),
}
_ST_DTYPE_NAMES = {
    "F64": "float64", "I64": "int64", "U64": "uint64", "I32": "int32", "U32": "uint32",
    "I16": "int16", "U16": "uint16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F6_E2M3": "float6_e2m3", "F6_E3M2": "float6_e3m2", "F4": "float4_e2m1", "C64": "complex64",
}  # fmt: skip
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
)
_SUPPORTED_TEXT = "float32, bfloat16, float16"


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor; no data is read to build it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int
    offset: int = 0
    """Absolute byte offset of the tensor's data in ``file``."""


class Checkpoint:
    """A validated, lazily read checkpoint. Build it with :func:`open_checkpoint`."""

    def __init__(
        self,
        root: Path,
        config: dict[str, Any],
        files: list[Path],
        infos: dict[str, TensorInfo],
        index_path: Path | None = None,
    ) -> None:
        self.root = root
        self.config = config
        self.files = files
        self.index_path = index_path
        self._infos = infos
        self._names = sorted(infos)
        self._handles: dict[Path, Any] = {}
        self._closed = False
        self.allow_nonfinite = False
        """Whether ``get`` hands out tensors holding NaN or infinity (``--allow-nonfinite``) instead of refusing them."""

    # -- metadata (headers only) ------------------------------------------------------
    def names(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Header information for ``name``; ``KeyError`` (with close matches) if absent."""
        try:
            return self._infos[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._names, n=3)
            extra = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"no tensor {name!r} in checkpoint {self.root}{extra}") from None

    def dtypes(self) -> set[torch.dtype]:
        """The set of dtypes the tensors use."""
        return {i.dtype for i in self._infos.values()}

    def total_bytes(self) -> int:
        """Sum of all tensors' data sizes in bytes (headers excluded)."""
        return sum(i.nbytes for i in self._infos.values())

    # -- data -------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a CPU tensor owning its memory) from its file.

        The bytes are read with a plain positioned read into a fresh buffer, not through a
        memory map, so once the caller drops the tensor its memory is gone: streaming a
        model through ``get`` keeps resident memory bounded by what the caller holds.
        """
        if self._closed:
            raise RuntimeError(f"checkpoint {self.root} is closed")
        info = self.info(name)
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = open(info.file, "rb")  # noqa: SIM115 - kept open until close()
                self._handles[info.file] = handle
            buf, got = _read_tensor_bytes(handle, info.offset, info.nbytes)
        except OSError as exc:
            raise CheckpointError(
                f"cannot read tensor {name!r} from {info.file}: {exc}",
                hint="the file may have changed since it was opened; re-run the command",
            ) from exc
        if got != info.nbytes:
            raise CheckpointError(
                f"tensor {name!r} in {info.file}: read {got} of {info.nbytes} bytes",
                hint="the file changed (was truncated) since it was opened; re-run the command",
            )
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns about non-writable buffers only
            tensor = torch.frombuffer(buf, dtype=info.dtype)
        if sys.byteorder != "little":  # safetensors data is little-endian
            tensor = tensor.view(torch.uint8).view(-1, tensor.element_size()).flip(-1).reshape(-1).view(info.dtype)
        if not self.allow_nonfinite and tensor.is_floating_point():
            bad = count_nonfinite(tensor)
            if bad:
                raise CheckpointError(
                    f"tensor {name!r} in {info.file} holds {bad} NaN or infinite value(s) of {tensor.numel()}",
                    hint="the checkpoint is damaged (every score and plan built on it would be meaningless); "
                    "if this is intended, pass --allow-nonfinite",
                )
        return tensor.reshape(info.shape)

    def sha256(self) -> dict[str, str]:
        """Hex sha256 of every input file (config, index, safetensors), keyed by file name."""
        paths = [self.root / CONFIG_NAME]
        if self.index_path is not None:
            paths.append(self.index_path)
        paths.extend(self.files)
        out: dict[str, str] = {}
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        for p in paths:
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                while n := fh.readinto(buf):
                    h.update(view[:n])
            out[_rel_name(p, self.root)] = h.hexdigest()
        return out

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        """Release the open file handles; ``get`` fails afterwards."""
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h.close()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.root)!r}, model_type={self.config.get('model_type')!r}, "
            f"tensors={len(self._infos)}, files={len(self.files)})"
        )


# ------------------------------------------------------------------------------------
def count_nonfinite(tensor: torch.Tensor, chunk: int = 1 << 24) -> int:
    """NaN and infinite elements of a floating tensor, checked in chunks (no full-size mask)."""
    flat = tensor.reshape(-1)
    return sum(int((~torch.isfinite(flat[i : i + chunk])).sum()) for i in range(0, flat.numel(), chunk))


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open and validate a checkpoint: a ``.safetensors`` file with ``config.json`` beside it,
    or a folder with ``config.json`` and one safetensors file or an indexed set of shards.

    Only headers are read; every problem found raises :class:`CheckpointError`.
    """
    p = Path(os.fspath(path)).expanduser()
    check_name_length(p, "checkpoint path", error=CheckpointError)  # else exists() ends in "File name too long"
    if not p.exists():
        raise CheckpointError(
            f"checkpoint path {p} does not exist",
            hint="pass a folder holding config.json and *.safetensors, or a .safetensors file",
        )
    if p.is_dir():
        root = p
        files, index_path, weight_map = _find_files_in_folder(root)
    else:
        root = p.parent
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{p} is a pickled PyTorch checkpoint; hydracc requires safetensors and does "
                "not load pickled checkpoints, since unpickling can run arbitrary code",
                hint="convert it to safetensors in a trusted environment (e.g. "
                "model.save_pretrained(out, safe_serialization=True)) and pass that",
            )
        if p.name in (CONFIG_NAME, INDEX_NAME):
            files, index_path, weight_map = _find_files_in_folder(root)
        elif p.suffix != ".safetensors":
            raise CheckpointError(
                f"{p} is not a .safetensors file",
                hint="pass a folder holding config.json and *.safetensors, or a .safetensors file",
            )
        else:
            _refuse_single_shard(p)
            files, index_path, weight_map = [p], None, None
    config = read_config(root)
    if isinstance(config.get("model_type"), str):  # an encoder is told so, not that its causal-LM head is missing
        from hydracc.frontend.model import check_decoder_only

        check_decoder_only(config["model_type"], config)

    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in _read_header(f).items():
            if name in infos:
                raise CheckpointError(
                    f"tensor {name!r} appears in two shards: {infos[name].file} and {f}",
                    hint="the shards come from different saves; re-download or re-save the model",
                )
            infos[name] = info
    if index_path is not None and weight_map is not None:
        _check_index_against_headers(index_path, weight_map, root, infos)
    if not infos:
        raise CheckpointError(
            f"checkpoint {root} holds no tensors",
            hint="check that the right folder was given and the files are complete",
        )
    return Checkpoint(root, config, files, infos, index_path)


def _rel_name(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.name


def refuse_json_constant(name: str) -> Any:
    """``json.loads``' ``parse_constant``: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def load_json(text: str | bytes, where: object, hint: str) -> Any:
    """Strict JSON for files hydracc reads: NaN/Infinity, nesting deeper than the parser's stack
    and integers past Python's digit limit are a ``CheckpointError``, never a crash."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=refuse_json_constant)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where} is not valid JSON: {exc}", hint=hint) from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where} is not valid JSON (not UTF-8 text at byte {exc.start})", hint=hint) from exc
    except RecursionError:
        raise CheckpointError(f"{where} nests too deeply to be valid", hint=hint) from None
    except ValueError as exc:  # NaN / Infinity, an integer of thousands of digits
        raise CheckpointError(f"{where} is not valid JSON: {exc}", hint=hint) from exc


def read_config(root: Path) -> dict[str, Any]:
    """Parse and check ``root/config.json`` (a JSON object with a ``model_type``)."""
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"no {CONFIG_NAME} in {root}",
            hint="put the model's config.json beside the safetensors files (as written by save_pretrained)",
        )
    config = load_json(cfg_path.read_bytes(), cfg_path, "fix or re-download config.json")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{cfg_path} must hold a JSON object, found {type(config).__name__}",
            hint="fix or re-download config.json",
        )
    mt = config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise CheckpointError(
            f"{cfg_path} has no 'model_type'",
            hint='add the architecture\'s model_type (e.g. "llama") or re-save the config with transformers',
        )
    return config


def _find_files_in_folder(
    root: Path,
) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    index_path = root / INDEX_NAME
    if index_path.is_file():
        files, weight_map = _read_index(index_path, root)
        return files, index_path, weight_map
    single = root / SINGLE_NAME
    if single.is_file():
        return [single], None, None
    found = sorted(q for q in root.glob("*.safetensors") if q.is_file())
    if len(found) == 1:
        return found, None, None
    if not found:
        pickled = sorted(q.name for q in root.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
        if pickled:
            raise CheckpointError(
                f"{root} holds only pickled weights ({', '.join(pickled[:3])}); hydracc "
                "requires safetensors and does not load pickled checkpoints for safety",
                hint="convert to safetensors in a trusted environment "
                "(model.save_pretrained(out, safe_serialization=True))",
            )
        raise CheckpointError(
            f"no safetensors files in {root}",
            hint="pass the folder that holds the model's *.safetensors and config.json",
        )
    names = ", ".join(q.name for q in found[:5]) + (", ..." if len(found) > 5 else "")
    raise CheckpointError(
        f"{root} holds {len(found)} safetensors files ({names}) but no {INDEX_NAME}",
        hint=f"add the {INDEX_NAME} that came with the shards, or pass one file directly",
    )


def _read_index(index_path: Path, root: Path) -> tuple[list[Path], dict[str, str]]:
    hint = f"re-download {INDEX_NAME} or re-save the model with save_pretrained"
    doc = load_json(index_path.read_bytes(), index_path, hint)
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise CheckpointError(
            f"{index_path} is malformed: expected an object with a 'weight_map' object",
            hint=hint,
        )
    if "metadata" in doc and not isinstance(doc["metadata"], (dict, type(None))):
        raise CheckpointError(f"{index_path} is malformed: 'metadata' is not an object", hint=hint)
    wm: dict[Any, Any] = doc["weight_map"]
    if not wm:
        raise CheckpointError(f"{index_path} is malformed: 'weight_map' is empty", hint=hint)
    counts: dict[str, int] = {}
    for name, fname in wm.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(
                f"{index_path} is malformed: tensor {name!r} maps to {fname!r}, not a file name",
                hint=hint,
            )
        rel = Path(fname)
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} maps to {fname!r}, outside the checkpoint folder",
                hint="shard names in the index must be file names inside the checkpoint folder",
            )
        if rel.suffix.lower() in PICKLE_SUFFIXES or rel.suffix != ".safetensors":
            raise CheckpointError(
                f"{index_path}: tensor {name!r} maps to {fname!r}, which is not a .safetensors file",
                hint="hydracc requires safetensors shards; pickled shards are not loaded for safety",
            )
        counts[fname] = counts.get(fname, 0) + 1
    files = []
    for fname in sorted(counts):
        f = root / fname
        if not f.is_file():
            raise CheckpointError(
                f"{index_path} references {fname} ({counts[fname]} tensors), but {f} does not exist",
                hint="download the missing shard, or re-save the model",
            )
        files.append(f)
    return files, wm


def _check_index_against_headers(
    index_path: Path, wm: dict[str, str], root: Path, infos: dict[str, TensorInfo]
) -> None:
    hint = "the index does not match the shards; re-download the checkpoint or re-save it"
    for name, fname in wm.items():
        info = infos.get(name)
        if info is None:
            raise CheckpointError(
                f"{index_path} lists tensor {name!r} in {fname}, but no shard holds it",
                hint=hint,
            )
        if info.file != root / fname:
            raise CheckpointError(
                f"{index_path} lists tensor {name!r} in {fname}, but it is in {info.file.name}",
                hint=hint,
            )
    extra = sorted(set(infos) - set(wm))
    if extra:
        raise CheckpointError(
            f"{infos[extra[0]].file} holds tensor {extra[0]!r} that {index_path.name} does not "
            f"list ({len(extra)} such tensors)",
            hint=hint,
        )


def _refuse_single_shard(p: Path) -> None:
    """A file given directly that is one of several indexed shards would load a partial model."""
    index_path = p.parent / INDEX_NAME
    if not index_path.is_file():
        return
    try:
        wm = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        shards = set(wm.values())
    except (ValueError, RecursionError, AttributeError, TypeError):  # a broken index is reported where it is read
        return
    if p.name in shards and len(shards) > 1:
        raise CheckpointError(
            f"{p} is one of {len(shards)} shards listed by {index_path}; loading it alone would give a partial model",
            hint=f"pass the folder {p.parent} instead",
        )


def _read_header(f: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header; never reads tensor data."""
    size = f.stat().st_size
    broken = "the file is truncated or corrupt; re-download or re-save it"
    if size < 8:
        raise CheckpointError(f"{f} is {size} bytes, too small to be a safetensors file", hint=broken)
    with open(f, "rb") as fh:
        (hlen,) = struct.unpack("<Q", fh.read(8))
        if hlen > size - 8:
            raise CheckpointError(
                f"{f}: header length says {hlen} bytes but the file holds only {size - 8} bytes after it",
                hint=broken,
            )
        if hlen > MAX_HEADER_BYTES:
            raise CheckpointError(f"{f}: header length {hlen} exceeds the safetensors limit", hint=broken)
        raw = fh.read(hlen)
    header = load_json(raw, f"{f}: header", broken)
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: header is not a JSON object", hint=broken)

    data_size = size - 8 - hlen
    spans: list[tuple[int, int, str]] = []
    cut: list[tuple[int, int, str]] = []  # tensors whose data runs past the end of the file
    entries: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{f}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object", hint=broken)
        tag, shape, offs = (
            entry.get("dtype"),
            entry.get("shape"),
            entry.get("data_offsets"),
        )
        if not (isinstance(shape, list) and all(_is_nat(d) for d in shape)):
            raise CheckpointError(f"{where}: bad shape {shape!r} in header", hint=broken)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_nat(o) for o in offs)):
            raise CheckpointError(f"{where}: bad data_offsets {offs!r} in header", hint=broken)
        begin, end = offs
        if begin > end:
            raise CheckpointError(f"{where}: data_offsets {offs} run backwards", hint=broken)
        if end > data_size:
            cut.append((begin, end, name))
        if tag not in _ST_DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {tag!r} in header", hint=broken)
        bits = _ST_DTYPES[tag][0]
        expect = math.prod(shape) * bits
        if expect % 8 or expect // 8 != end - begin:
            raise CheckpointError(
                f"{where}: shape {shape} of {tag} needs {expect / 8:g} bytes but the header gives it {end - begin}",
                hint=broken,
            )
        spans.append((begin, end, name))
        entries[name] = (tuple(shape), tag, end - begin, 8 + hlen + begin)

    if cut:
        begin, end, name = min(cut)
        more = f" ({len(cut) - 1} more tensors after it are cut too)" if len(cut) > 1 else ""
        raise CheckpointError(
            f"{f}: tensor {name!r}: header says its data ends at byte {end} of the data "
            f"section, but the file holds only {data_size} data bytes (file size {size}): "
            f"the file is truncated{more}",
            hint="the download or copy is incomplete; re-download or re-save the file",
        )
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise CheckpointError(
                f"{f}: tensor {name!r} data starts at byte {begin} of the data section, "
                f"expected {pos} (overlapping or gapped tensors)",
                hint=broken,
            )
        pos = end
    if pos != data_size:
        raise CheckpointError(
            f"{f}: tensors cover {pos} data bytes but the file holds {data_size}",
            hint=broken,
        )

    infos: dict[str, TensorInfo] = {}
    for name, (shape, tag, nbytes, offset) in entries.items():
        dtype = _ST_DTYPES[tag][1]
        if dtype is None:
            raise CheckpointError(
                f"{f}: tensor {name!r} has dtype {_ST_DTYPE_NAMES.get(tag, tag)} ({tag}); "
                f"hydracc supports only {_SUPPORTED_TEXT}",
                hint="use an unquantized float32/bfloat16/float16 checkpoint, or convert the "
                "tensors to one of those dtypes first",
            )
        infos[name] = TensorInfo(name, shape, dtype, f, nbytes, offset)
    return infos


def _read_tensor_bytes(handle: Any, offset: int, nbytes: int) -> tuple[bytearray, int]:
    """The data path: ``nbytes`` from ``offset`` of an open binary file, and how many were read."""
    buf = bytearray(nbytes)
    handle.seek(offset)
    return buf, handle.readinto(buf) or 0


def _is_nat(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
