"""hydracc eval: fixed-seed scores, and it tells a working model from a broken one."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT

from hydracc.cli import main
from hydracc.convert import convert
from hydracc.evaluation.evaluate import EvalSettings, evaluate

SMALL = EvalSettings(ppl_windows=8, mqar_pairs=(4,), mqar_seq_lens=(64,), mqar_samples=8, passkey_lengths=(96,),
                     passkey_samples=4, batch=8)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    out = tmp_path_factory.mktemp("byte-model")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def test_same_numbers_twice(byte_model) -> None:
    a = evaluate(byte_model, settings=SMALL).to_json()
    b = evaluate(byte_model, settings=SMALL).to_json()
    assert a == b
    assert set(a) >= {"ppl", "mqar", "passkey"} and a["converted"] is False
    assert a["ppl"]["ppl"] > 1 and 0 <= a["mqar"]["accuracy"] <= 1


def test_converted_all_full_scores_like_the_original(byte_model, tmp_path) -> None:
    convert(byte_model, tmp_path / "full", full_ratio=1.0, strategy="even")
    original = evaluate(byte_model, settings=SMALL).to_json()
    converted = evaluate(tmp_path / "full", settings=SMALL).to_json()
    assert converted["converted"] is True
    for task in ("ppl", "mqar", "passkey"):
        assert converted[task] == original[task]


def test_cli_eval_json(byte_model) -> None:
    res = CliRunner().invoke(main, ["eval", str(byte_model), "--task", "ppl", "--json", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ppl"]["tokens"] == 64 * 128 and report["tokens"] == "bytes"


def _char_tokenizer(folder) -> None:
    """A character-level tokenizer.json for a vocab-64 model: 43 ids used, two of them special."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    chars = list("abcdefghijklmnopqrstuvwxyzTW0123456789 .?")
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.add_special_tokens([AddedToken("[UNK]", special=True), AddedToken("<s>", special=True)])
    tok.save(str(folder / "tokenizer.json"))


def test_other_vocabularies_in_their_own_tokens(tiny_checkpoint, tmp_path) -> None:
    import shutil

    ids_only = tiny_checkpoint("llama-gqa")  # vocab 64, no tokenizer
    res = evaluate(ids_only, ("mqar", "passkey"), SMALL).to_json()
    assert res["tokens"] == "ids only" and 0 <= res["mqar"]["accuracy"] <= 1 and 0 <= res["passkey"]["accuracy"] <= 1
    assert evaluate(ids_only, ("mqar", "passkey"), SMALL).to_json() == res
    res = CliRunner().invoke(main, ["eval", str(ids_only), "--json"])  # no text in its tokens: say how to give some
    assert res.exit_code == 2 and "--calib" in json.loads(res.stdout)["error"]
    with_tok = tmp_path / "with-tokenizer"
    shutil.copytree(ids_only, with_tok)
    _char_tokenizer(with_tok)
    res = evaluate(with_tok, settings=SMALL).to_json()
    assert res["tokens"] == "the checkpoint's tokenizer.json" and res["ppl"]["tokens"] == 8 * 128
    assert "bits_per_token" in res["ppl"]
    np_ids = np.random.default_rng(0).integers(0, 64, size=(8, 200))
    np.save(tmp_path / "ids.npy", np_ids)
    res = evaluate(ids_only, ("ppl",), SMALL, calib=tmp_path / "ids.npy").to_json()
    assert res["ppl"]["text"] == "--calib rows" and res["ppl"]["tokens"] == 8 * 128


def test_probes_score_only_recall() -> None:
    from hydracc.evaluation.probes import TokenSpace, passkey_probe, recall_probe

    space = TokenSpace(1000, pool=np.arange(250, 750))
    x, y = recall_probe(space, 8, 64, np.random.default_rng(0))
    answers = np.flatnonzero(y != -100)
    pairs = dict(zip(x[:16:2], x[1:16:2], strict=True))
    assert len(answers) == 8 and all(pairs[x[i]] == y[i] for i in answers)
    assert set(x[16 : answers[0]]).isdisjoint(pairs) and set(x[16 : answers[0]]).isdisjoint(pairs.values())
    x, y = passkey_probe(space, 64, np.random.default_rng(0))
    key = y[y != -100]
    assert len(key) == 5 and len(x) == 64
    start = next(i for i in range(len(x) - 4) if list(x[i : i + 5]) == list(key))
    assert start < len(x) - 6  # the key appears earlier, so it can be recalled


@pytest.mark.slow
def test_training_script_runs(tmp_path) -> None:
    out = tmp_path / "trained"
    script = [sys.executable, str(ROOT / "examples" / "train_tiny.py")]
    proc = subprocess.run([*script, "--out", str(out), "--steps", "3", "--width", "32", "--log-every", "1",
                           "--long-steps", "2", "--long-len", "192"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log["log"]] == [0, 1, 2] and [e["step"] for e in log["long_log"]] == [0, 1]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    res = evaluate(out, ("ppl",), SMALL).to_json()
    assert res["ppl"]["ppl"] > 1
    # phase 2 alone from a saved model keeps phase 1's record
    proc = subprocess.run([*script, "--init", str(out), "--out", str(tmp_path / "longer"), "--steps", "0", "--log-every", "1",
                           "--long-steps", "1", "--long-len", "192"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "longer" / "training_log.json").read_text())
    assert again["log"] == log["log"] and again["steps"] == 3 and [e["step"] for e in again["long_log"]] == [0]


def test_recall_probes_from_a_file_and_bad_files(tiny_checkpoint, tmp_path) -> None:
    model = tiny_checkpoint("llama-gqa")  # vocab 64
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(6, 40))
    labels = np.full_like(ids, -100)
    labels[:, 30] = ids[:, 31]
    short = np.full((3, 20), -100)
    short[:, 5] = ids[:3, 6]
    np.savez(tmp_path / "probes.npz", ids_40=ids, labels_40=labels, ids_20=ids[:3, :20], labels_20=short)
    res = evaluate(model, ("recall",), SMALL, recall=tmp_path / "probes.npz").to_json()
    rec = res["recall"]
    assert set(rec["by_set"]) == {"20 (len=20)", "40 (len=40)"} and 0 <= rec["accuracy"] <= 1 and rec["file"] == "probes.npz"
    # the score is the argmax at the labelled positions: check one set against the model directly
    from helpers import load_original

    m = load_original(model)
    with torch.no_grad():
        pred = m(input_ids=torch.from_numpy(ids)).logits.argmax(-1)[:, 30].numpy()
    assert rec["by_set"]["40 (len=40)"] == round(float((pred == ids[:, 31]).mean()), 4)
    res = CliRunner().invoke(main, ["eval", str(model), "--task", "recall", "--recall", str(tmp_path / "probes.npz"),
                                    "--json", "-q"])
    assert res.exit_code == 0 and json.loads(res.stdout)["recall"] == rec
    bad = {
        "none.npz": None,
        "pickled.npz": {"ids_8": np.array([{"a": 1}], dtype=object)},
        "nolabels.npz": {"ids_8": ids},
        "outside.npz": {"ids_8": ids + 64, "labels_8": labels},
        "unscored.npz": {"ids_8": ids, "labels_8": np.full_like(ids, -100)},
    }
    for name, arrays in bad.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        res = CliRunner().invoke(main, ["eval", str(model), "--task", "recall", "--recall", str(tmp_path / name), "--json"])
        assert res.exit_code == 2 and "--recall" in json.loads(res.stdout)["error"], (name, res.output)
    res = CliRunner().invoke(main, ["eval", str(model), "--task", "recall", "--json"])
    assert res.exit_code == 2 and "--recall" in json.loads(res.stdout)["error"]


@pytest.mark.parametrize("flags", [("--rows", "foo=1"), ("--rows", "recall=0"), ("--rows", "text=1.5"),
                                   ("--weights", "induction=x"), ("--weights", "text=-1"), ("--spans", "40,70"),
                                   ("--spans", "4"), ("--spans", "4,40"), ("--warm-steps", "-1"),
                                   ("--warm-rows", "0"), ("--warm-len", "16"), ("--steps", "-3")])
def test_second_training_script_refuses_bad_flags(tmp_path, flags) -> None:
    out = tmp_path / "qwen"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny_qwen.py"), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", [("--warm-steps", "2"),
                                     ("--warm-steps", "0", "--no-adjacent", "--no-induction-pool", "--pool", "unused",
                                      "--spans", "16,48", "--heads", "4", "--rows", "text=1,recall=1,induction=1,passkey=1")],
                         ids=["committed", "variants"])
def test_second_training_script_runs(tmp_path, variant) -> None:
    out = tmp_path / "qwen"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny_qwen.py"), "--out", str(out), "--steps", "2",
                           "--log-every", "1", *variant], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    log = json.loads((out / "training_log.json").read_text())
    committed = "--no-adjacent" not in variant
    if committed:  # phase 1 (induction rows alone), then the mixture, numbered on
        assert [(e["step"], e.get("phase")) for e in log["log"]] == [(0, "warm"), (1, "warm"), (2, None), (3, None)]
        assert log["warm_steps"] == 2 and log["steps"] == 2
    else:
        assert ["passkey" in e for e in log["log"]] == [True, True]
    assert log["adjacent"] is committed and log["induction_pool"] is committed
    probes = np.load(out / "recall.npz")
    assert (log["markers"]["<is>"] in probes["ids_128"]) is not committed  # <set> k v <;> has no <is>
    assert {"config.json", "model.safetensors", "tokenizer.json", "calib.npy", "recall.npz"} <= {p.name for p in out.iterdir()}
    res = evaluate(out, ("recall",), SMALL, recall=out / "recall.npz").to_json()
    assert set(res["recall"]["by_set"]) == {"128 (len=128)", "256 (len=256)"}
