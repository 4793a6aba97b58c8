"""Calibration data: the three file forms, the built-in sets, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hydracc.analysis.calibration import CalibrationError, default_calibration, load_calibration


def test_text_and_jsonl_are_bytes_for_a_byte_model(tmp_path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("abcdefgh" * 10)
    cal = load_calibration(txt, vocab_size=256, samples=3, seq_len=16)
    assert cal.tokens.shape == (3, 16) and cal.tokens[0, :3].tolist() == [97, 98, 99]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": "xyz" * 20}) for _ in range(2)) + "\n")
    assert load_calibration(jl, vocab_size=256, samples=8, seq_len=16).samples == 7  # 2*60+2 bytes -> 7 rows


def test_npy_rows_and_stream(tmp_path) -> None:
    rows = tmp_path / "rows.npy"
    np.save(rows, np.arange(40, dtype=np.int32).reshape(4, 10) % 50)
    cal = load_calibration(rows, vocab_size=50, samples=3, seq_len=8)
    assert cal.tokens.shape == (3, 8) and cal.tokens.dtype == np.int64
    stream = tmp_path / "stream.npy"
    np.save(stream, np.arange(30) % 50)
    assert load_calibration(stream, vocab_size=50, samples=10, seq_len=8).tokens.shape == (3, 8)


def test_tokenizer_json_is_used_for_other_vocabularies(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    txt = tmp_path / "c.txt"
    txt.write_text("hello world " * 8 + "other")
    cal = load_calibration(txt, vocab_size=3, samples=2, seq_len=4, checkpoint_root=tmp_path)
    assert cal.tokens.tolist() == [[1, 2, 1, 2], [1, 2, 1, 2]]


@pytest.mark.parametrize(
    ("name", "content", "kw", "match"),
    [
        ("missing.txt", None, {}, "does not exist"),
        ("short.txt", "abc", {}, "fewer than one sequence"),
        ("bad.jsonl", '{"text": "a"}\nnot json\n', {}, "line 2"),
        ("nofield.jsonl", '{"body": "a"}\n', {}, "\"text\" field"),
        ("floats.npy", np.zeros((2, 16), dtype=np.float32), {}, "not integer"),
        ("range.npy", np.full((2, 16), 300), {}, "outside the model's vocabulary"),
        ("short.npy", np.zeros((2, 4), dtype=np.int64), {}, "shorter than"),
        ("plain.txt", "hello " * 20, {"vocab_size": 1000}, "no tokenizer.json"),
        ("empty.npy", np.zeros((0, 16), dtype=np.int64), {}, "no calibration rows"),
    ],
)
def test_bad_calibration_files_fail_clearly(tmp_path, name, content, kw, match) -> None:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=match):
        load_calibration(path, **{"vocab_size": 256, "samples": 4, "seq_len": 8, **kw})


def test_pickled_npy_is_refused(tmp_path) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationError):
        load_calibration(path, vocab_size=256, samples=4, seq_len=8)


def test_builtin_sets_are_fixed_and_fit_the_vocabulary() -> None:
    a = default_calibration(vocab_size=256, samples=8, seq_len=64)
    assert np.array_equal(a.tokens, default_calibration(vocab_size=256, samples=8, seq_len=64).tokens)
    assert a.tokens.shape == (8, 64) and "MQAR" in a.source
    b = default_calibration(vocab_size=1000, samples=4, seq_len=32)
    assert b.tokens.max() < 1000 and "synthetic" in b.source
    assert np.array_equal(b.tokens[0, 16:], b.tokens[0, :16])  # a repeated span
