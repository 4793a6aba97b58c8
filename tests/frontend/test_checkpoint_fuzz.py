"""The safetensors header reader under fuzzing: random files and valid files with bytes flipped.

``open_checkpoint`` (and reading every tensor) either works or raises ``CheckpointError``
(exit code 2), and answers within a second of CPU time; nothing is unpickled, nothing else escapes.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from hydracc.errors import CheckpointError
from hydracc.frontend.checkpoint import open_checkpoint

CONFIG = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1}


def _valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_file({"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}, path)
        return path.read_bytes()


VALID = _valid_file()


def _open_and_read(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        (folder / "model.safetensors").write_bytes(data)
        start = time.process_time()  # this process's CPU time: another process's load cannot fail it
        try:
            with open_checkpoint(folder) as ck:
                for name in ck.names():
                    ck.get(name)
        except CheckpointError:
            pass
        assert time.process_time() - start < 1.0


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_random_files(data: bytes) -> None:
    _open_and_read(data)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_behind_a_plausible_length(data: bytes) -> None:
    _open_and_read(struct.pack("<Q", len(data)) + data)


@settings(max_examples=250, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, len(VALID)))
def test_valid_file_with_bytes_changed_or_cut(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID)
    for i, b in flips:
        data[i] = b
    _open_and_read(bytes(data[:cut]) if cut < len(VALID) and flips[0][1] % 2 else bytes(data))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
    max_size=4))
def test_hostile_header_json(header: dict) -> None:
    raw = json.dumps(header).encode()
    _open_and_read(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


HOSTILE_JSON = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "huge integer": b'{"a": ' + b"9" * 5_000 + b"}",
    "NaN": b'{"a": NaN}',
    "Infinity": b'{"a": -Infinity}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_json_the_strategies_cannot_reach(tmp_path, name: str) -> None:
    """Nesting past the parser's stack, integers past Python's digit limit and NaN, in the header,
    config.json and the shard index: a CheckpointError (exit 2), never a crash."""
    raw = HOSTILE_JSON[name]
    _open_and_read(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    for target in ("config.json", "model.safetensors.index.json"):
        folder = tmp_path / f"{target}-{len(name)}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(CONFIG))
        (folder / "model.safetensors").write_bytes(VALID)
        (folder / target).write_bytes(raw)
        with pytest.raises(CheckpointError, match="not valid JSON|nests too deeply"):
            open_checkpoint(folder)
