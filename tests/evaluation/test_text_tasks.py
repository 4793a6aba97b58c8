"""The text tasks of models with a real tokenizer: deterministic builders, scoring, eval --json, the floor."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hydracc.cli import main
from hydracc.evaluation.evaluate import EvalSettings, default_tasks, evaluate
from hydracc.evaluation.prose import _normalized, prose_corpus
from hydracc.evaluation.text_eval import TEXT_TASKS, TextSettings
from hydracc.evaluation.text_tasks import (
    IGNORE,
    TextTokenizer,
    copy_row,
    first_digits,
    kv_prompt,
    passkey_prompt,
    prose_windows,
)

SMALL = EvalSettings(text=TextSettings(prose_windows=2, prose_seq_len=64, passkey_lengths=(256,), copy_lengths=(256,),
                                       kv_lengths=(256,), samples=1, copy_span_words=12, kv_pairs=3, max_new_tokens=6))
"""At 256 tokens, samples=1 gives 4 samples per cell."""
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _bpe_tokenizer():
    """A byte-level BPE trained on the prose (about 5,000 ids), special tokens, and a BOS its post-processor adds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=5000, special_tokens=["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = prose_corpus()
    tok.train_from_iterator([corpus.train, corpus.heldout, " ".join(str(i) for i in range(100))], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random Llama with a real BPE tokenizer, tied embeddings, a chat template and special tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("text-model")
    tok = _bpe_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, rope_theta=1e5,
                      bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("<|im_end|>"),
                      pad_token_id=tok.token_to_id("<|im_end|>"), max_position_embeddings=4096)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(text_model):
    from tokenizers import Tokenizer

    return TextTokenizer(Tokenizer.from_file(str(text_model / "tokenizer.json")))


def test_prose_split_is_disjoint_and_english() -> None:
    corpus = prose_corpus()
    assert len(corpus.heldout) > 20_000 and len(corpus.train) > len(corpus.heldout)
    assert set(corpus.heldout_files).isdisjoint(corpus.train_files)
    train = {_normalized(p) for p in corpus.train.split("\n\n")}
    assert not any(_normalized(p) in train for p in corpus.heldout.split("\n\n"))
    assert corpus.heldout.count(" the ") > 200  # prose, not code
    assert prose_corpus().digest == corpus.digest


def test_calibration_never_reads_the_heldout_prose(tok, text_model) -> None:
    from hydracc.analysis.calibration import default_calibration
    from hydracc.evaluation.probes import token_space

    space = token_space(text_model, tok.tokenizer.get_vocab_size())
    rows = default_calibration(vocab_size=space.vocab_size, samples=8, seq_len=256, space=space).tokens
    text = " ".join(tok.decode(r) for r in rows)
    for sentence in [s for s in prose_corpus().heldout.split(". ") if len(s) > 80][:200]:
        assert sentence not in text
    assert "magic number" not in text and "The code for" not in text  # the eval formats are not calibration's


def test_builders_are_deterministic_and_answerable(tok) -> None:
    assert list(tok.prefix) == [tok.tokenizer.token_to_id("<s>")]  # the BOS its post-processor adds
    for build in (passkey_prompt, kv_prompt):
        a, b = build(tok, 512, np.random.default_rng(7)), build(tok, 512, np.random.default_rng(7))
        assert np.array_equal(a.ids, b.ids) and a.answer == b.answer
        assert 0.85 * 512 <= len(a.ids) <= 1.15 * 512, len(a.ids)
        assert a.ids[0] == tok.prefix[0]
        text = tok.decode(a.ids)
        assert text.count(a.answer) >= 1 and a.answer.isdigit()
    p = kv_prompt(tok, 512, np.random.default_rng(3), pairs=4)
    text = tok.decode(p.ids)
    asked = text.rsplit("The code for ", 1)[1].removesuffix(" is")
    assert f"The code for {asked} is {p.answer}." in text and text.count("The code for") == 5
    x, y = copy_row(tok, 512, np.random.default_rng(1), span_words=16)
    x2, y2 = copy_row(tok, 512, np.random.default_rng(1), span_words=16)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and len(x) == len(y)
    scored = np.flatnonzero(y != IGNORE)
    assert scored[-1] == len(y) - 1 and np.all(np.diff(scored) == 1)
    span = y[scored]
    first = next(i for i in range(len(x) - len(span)) if np.array_equal(x[i : i + len(span)], span))
    assert first < len(x) // 2  # the span was there before, far back
    rows, prefix = prose_windows(tok, 3, 64, np.random.default_rng(0))
    assert rows.shape == (3, 65) and prefix == 1


def test_answer_scoring() -> None:
    assert first_digits(" 48213. Remember it.") == "48213"
    assert first_digits("The magic number is 4821 3") == "4821"
    assert first_digits(" a number") == ""


def test_eval_json_has_the_text_tasks(text_model) -> None:
    assert default_tasks(text_model) == TEXT_TASKS
    a = evaluate(text_model, settings=SMALL).to_json()
    b = evaluate(text_model, settings=SMALL).to_json()
    assert a == b
    assert set(TEXT_TASKS) <= set(a) and a["tokens"] == "the checkpoint's tokenizer.json"
    assert a["prose"]["ppl"] > 1 and a["prose"]["bos"] is True and a["prose"]["tokens"] == 2 * 64
    for task in ("passkey_gen", "copy", "kv_lookup"):
        assert set(a[task]["by_length"]) == {"len=256"} and a[task]["samples"] == {"len=256": 4}
        assert 0 <= a[task]["accuracy"] <= 1 and "below_floor" in a[task]
    assert a["passkey_gen"]["below_floor"] == ["len=256"]  # a random model cannot recall
    res = CliRunner().invoke(main, ["eval", str(text_model), "--tasks", "prose,copy", "--samples", "1", "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert set(report) >= {"prose", "copy"} and "passkey_gen" not in report
    assert report["copy"]["samples"] == {"len=512": 2, "len=1024": 1, "len=2048": 1}
    res = CliRunner().invoke(main, ["eval", str(text_model), "--tasks", "prose,copy", "--samples", "1"])
    assert res.exit_code == 0, res.output
    assert "prose" in res.output and "len=2048, 1 samples" in res.output  # the table
    res = CliRunner().invoke(main, ["eval", str(text_model), "--tasks", "nonsense", "--json", "-q"])
    assert res.exit_code == 2 and "unknown task" in json.loads(res.stdout)["error"]


def test_converted_is_judged_only_where_the_original_passes(text_model, tmp_path) -> None:
    from hydracc.convert import convert

    convert(text_model, tmp_path / "conv", full_ratio=0.5, strategy="even")
    original = evaluate(text_model, TEXT_TASKS, SMALL).to_json()
    # pretend the original passes copy but not passkey/kv: only copy is run on the converted model
    original["copy"]["by_length"] = {"len=256": 0.9}
    original["passkey_gen"]["by_length"]["len=1024"] = 0.25
    (tmp_path / "original.json").write_text(json.dumps(original))
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "conv"), "--original", str(tmp_path / "original.json"),
                                    "--samples", "1", "--tasks", "passkey_gen,copy", "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["converted"] is True
    assert report["passkey_gen"]["by_length"] == {} and report["passkey_gen"]["accuracy"] is None
    assert "below the 50% floor" in report["passkey_gen"]["not_judged"]["len=1024"]
    assert set(report["copy"]["not_judged"]) == {"len=512", "len=1024", "len=2048"}  # the report has only len=256
    # with the same settings, the cell the original passes is scored, through the hybrid model
    conv = evaluate(tmp_path / "conv", ("copy",), SMALL, original=original).to_json()
    assert set(conv["copy"]["by_length"]) == {"len=256"} and conv["copy"]["not_judged"] == {}
    full = replace(SMALL, text=replace(SMALL.text, samples=1))
    assert evaluate(tmp_path / "conv", ("passkey_gen",), full).to_json()["passkey_gen"]["samples"] == {"len=256": 4}


def test_probe_tasks_still_run_on_a_text_model(text_model) -> None:
    small = replace(SMALL, mqar_pairs=(4,), mqar_seq_lens=(64,), mqar_samples=4, passkey_lengths=(96,), passkey_samples=4)
    res = evaluate(text_model, ("mqar", "passkey"), small).to_json()
    assert 0 <= res["mqar"]["accuracy"] <= 1 and 0 <= res["passkey"]["accuracy"] <= 1
