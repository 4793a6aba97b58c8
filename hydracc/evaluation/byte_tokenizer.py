"""A byte-level tokenizer in Hugging Face format whose token ids are the byte values.

Design: built with the ``tokenizers`` library (a byte-level BPE with no merges), so a model
that uses it is loadable by ``AutoTokenizer`` like any other, while ``id == byte`` keeps the
training data (``hydracc.evaluation.tasks``) trivially consistent with it. No special tokens: the
example model is trained on raw bytes.
"""

from __future__ import annotations

from pathlib import Path


def build_byte_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins, unordered
    table = _bytes_to_unicode()
    assert set(table.values()) == set(byte_to_char)
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def save_byte_tokenizer(folder: str | Path) -> None:
    build_byte_tokenizer().save_pretrained(str(folder))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the one ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))
