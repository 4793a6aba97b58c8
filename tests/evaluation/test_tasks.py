"""The data behind the example model and hydracc eval: structure, determinism, the corpus split."""

import numpy as np
import pytest

from hydracc.evaluation.byte_tokenizer import build_byte_tokenizer
from hydracc.evaluation.tasks import IGNORE, KEY_BASE, VALUE_BASE, decode, mqar_example, passkey_example, stdlib_corpus


@pytest.mark.parametrize(("pairs", "seq_len"), [(2, 16), (8, 64), (16, 256)])
def test_mqar_answers_are_the_context_values(pairs: int, seq_len: int) -> None:
    x, y = mqar_example(pairs, seq_len, np.random.default_rng(0))
    assert x.shape == y.shape == (seq_len,)
    context = dict(zip(x[0 : 2 * pairs : 2].tolist(), x[1 : 2 * pairs : 2].tolist()))
    assert len(context) == pairs and all(KEY_BASE <= k < VALUE_BASE for k in context)
    scored = np.flatnonzero(y != IGNORE)
    assert len(scored) == pairs
    for pos in scored:  # at a scored position the input is a queried key and the label its value
        assert y[pos] == context[int(x[pos])]
    again = mqar_example(pairs, seq_len, np.random.default_rng(0))
    assert np.array_equal(again[0], x) and np.array_equal(again[1], y)


def test_mqar_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        mqar_example(16, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="distinct keys"):
        mqar_example(80, 512, np.random.default_rng(0))


@pytest.mark.parametrize("seq_len", [96, 128, 512])
def test_passkey_asks_for_the_hidden_key(seq_len: int) -> None:
    x, y = passkey_example(seq_len, np.random.default_rng(3))
    assert x.shape == (seq_len,)
    scored = np.flatnonzero(y != IGNORE)
    assert len(scored) == 5 and scored[-1] == seq_len - 1
    key = decode(y[scored])
    text = decode(x)
    assert f"The pass key is {key}. Remember it." in text
    assert text.endswith("What is the pass key? The pass key is " + key[:-1])


def test_corpus_split_is_by_file_and_fixed() -> None:
    corpus = stdlib_corpus()
    assert corpus.train_files > 100 and corpus.heldout_files > 10
    assert len(corpus.train) > 5 * len(corpus.heldout) > 0
    mid = len(corpus.heldout) // 2
    head = bytes(corpus.heldout[mid : mid + 1000].astype(np.uint8))
    assert head not in bytes(corpus.train.astype(np.uint8))  # held-out text is never trained on


def test_byte_tokenizer_ids_are_bytes() -> None:
    tok = build_byte_tokenizer()
    text = "def f(x):\n    return {'é': x}\t# ok"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
