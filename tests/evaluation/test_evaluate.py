"""hydracc eval: fixed-seed scores, and it tells a working model from a broken one."""

import json
import subprocess
import sys

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


def test_cli_eval_json_and_bad_vocab(byte_model, tiny_checkpoint) -> None:
    res = CliRunner().invoke(main, ["eval", str(byte_model), "--task", "ppl", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ppl"]["tokens"] == 64 * 128
    res = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama-gqa")), "--json"])
    assert res.exit_code == 2 and "byte-level" in json.loads(res.stdout)["error"]


@pytest.mark.slow
def test_training_script_runs(tmp_path) -> None:
    out = tmp_path / "trained"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_tiny.py"), "--out", str(out), "--steps", "3",
                           "--width", "32", "--log-every", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log["log"]] == [0, 1, 2]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    res = evaluate(out, ("ppl",), SMALL).to_json()
    assert res["ppl"]["ppl"] > 1
