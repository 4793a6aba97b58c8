"""Calibration data: the three file forms, the built-in sets, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert 250 <= b.tokens.min() and b.tokens.max() < 750 and "probes" in b.source  # ordinary ids: the middle half
    assert np.array_equal(b.tokens[0, 16:], b.tokens[0, :16])  # no tokenizer: a repeated span instead of text
    keys = b.tokens[1, :4:2]  # a recall probe: (key, value) pairs first, every key asked again at the end
    assert set(keys) <= set(b.tokens[1, -8:].tolist())


def test_builtin_set_for_a_tokenizer_vocabulary_is_text_and_probes_in_its_tokens(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from hydracc.evaluation.probes import token_space
    from hydracc.evaluation.tasks import stdlib_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 50, "import os\nprint(os.getcwd())\n" * 50],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    space = token_space(tmp_path, tok.get_vocab_size())
    cal = default_calibration(vocab_size=tok.get_vocab_size(), samples=4, seq_len=64, space=space)
    assert "tokenizer.json" in cal.source and cal.tokens.shape == (4, 64)
    assert not np.isin(cal.tokens, [tok.token_to_id("<s>")]).any()  # special tokens never appear
    text = tok.decode(cal.tokens[0].tolist())
    corpus = bytes(stdlib_corpus().train[:2_000_000].astype(np.uint8)).decode("utf-8", errors="ignore")
    assert len(text) > 64 and text[1:-1] in corpus  # row 0: training-split text, as the tokenizer writes it
