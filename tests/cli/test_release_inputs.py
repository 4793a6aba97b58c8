"""Release-pipeline behaviour of the CLI: verify's exit codes, SIGTERM, non-finite weights, early output
checks, the model card, and generate's prompt limit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT
from safetensors.torch import load_file, save_file

from hydracc.cli import main

EXAMPLE = ROOT / "examples" / "tiny-llama"


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the JSON output")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("release")
    out = {}
    for name, ratio in (("full", "1.0"), ("linear", "0.0")):
        res = run("convert", EXAMPLE, "-o", root / name, "--strategy", "even", "--full-ratio", ratio, "--linear-kind",
                  "elu", "-q")
        assert res.exit_code == 0, res.output
        out[name] = root / name
    return out


def test_verify_exit_codes_and_json(converted) -> None:
    fast = ["--samples", "4", "--seq-len", "64"]
    res = run("verify", EXAMPLE, converted["full"], *fast, "--json", "-q")
    assert res.exit_code == 0, res.output
    report = _strict(res.stdout)
    assert report["passed"] is True and report["status"] == "ok"
    assert set(report["checks"]) == {"ppl_increase", "recall_ratio", "agreement"}
    assert report["checks"]["agreement"]["threshold"] == 0.8 and report["figures"]["agreement"] == 1.0
    res = run("verify", EXAMPLE, converted["linear"], *fast, "--json", "-q")
    assert res.exit_code == 3, res.output
    report = _strict(res.stdout)
    assert report["passed"] is False and not report["checks"]["ppl_increase"]["ok"]
    res = run("verify", EXAMPLE, converted["linear"], *fast, "--max-ppl-increase", "1000", "--min-recall-ratio", "0",
              "--min-agreement", "0")
    assert res.exit_code == 0 and "passed" in res.output
    res = run("verify", converted["full"], converted["linear"], *fast)
    assert res.exit_code == 2 and "itself a converted checkpoint" in res.output
    res = run("verify", EXAMPLE, converted["full"], "--device", "cuda:7", *fast)
    assert res.exit_code == 2


def test_model_card_in_the_output(converted, tmp_path) -> None:
    card = (converted["full"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "# tiny-llama: the hydracc example model" in card  # the input's card, kept below ours
    res = run("convert", EXAMPLE, "-o", tmp_path / "c", "--strategy", "even", "--base-model", "me/tiny-llama", "-q")
    assert res.exit_code == 0, res.output
    assert 'base_model:\n- "me/tiny-llama"' in (tmp_path / "c" / "README.md").read_text()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "c").iterdir()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors like every other file


def test_missing_output_parent_is_found_before_any_work(tmp_path) -> None:
    start = time.perf_counter()
    res = run("convert", EXAMPLE, "-o", tmp_path / "no" / "such" / "out", "--distill")
    assert res.exit_code == 2 and "does not exist" in res.output
    assert time.perf_counter() - start < 10 and not (tmp_path / "no").exists()


def test_nonfinite_weights(tmp_path) -> None:
    src = tmp_path / "nan"
    shutil.copytree(EXAMPLE, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    res = run("convert", src, "--plan", "--calib-samples", "2", "--seq-len", "32", "--json")
    assert res.exit_code == 2 and "NaN or infinite" in _strict(res.stdout)["error"]
    # accepted weights still make no NaN scores: the analysis stops at the layer that makes them
    res = run("convert", src, "-o", tmp_path / "out", "--calib-samples", "2", "--seq-len", "32", "--json", "-q",
              "--allow-nonfinite")
    assert res.exit_code == 2 and "NaN at layer 1" in _strict(res.stdout)["error"], res.output
    assert not (tmp_path / "out").exists()
    res = run("convert", src, "-o", tmp_path / "out", "--strategy", "even", "--json", "-q", "--allow-nonfinite")
    assert res.exit_code == 0, res.output
    _strict(res.stdout)
    _strict((tmp_path / "out" / "config.json").read_text())
    # every command that loads weights refuses them too, before running anything, unless told otherwise
    for command in (["eval", tmp_path / "out", "--task", "ppl"], ["generate", tmp_path / "out", "--prompt", "hi"],
                    ["export-onnx", tmp_path / "out", "-o", tmp_path / "onnx"], ["verify", src, tmp_path / "out"],
                    ["eval", src, "--task", "ppl"]):
        res = run(*command)
        assert res.exit_code == 2 and "NaN or infinite" in res.output and "--allow-nonfinite" in res.output, (command, res.output)
    assert not (tmp_path / "onnx").exists()
    res = run("generate", tmp_path / "out", "--prompt", "hi", "--max-new-tokens", "2", "--allow-nonfinite")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(("key", "value"), [("num_attention_heads", 3), ("num_attention_heads", -4), ("hidden_size", "128")])
def test_a_converted_checkpoint_with_a_bad_config_is_bad_input(converted, tmp_path, key, value) -> None:
    """The load path makes the config checks convert makes: exit 2 with the field, not a crash."""
    bad = tmp_path / "bad"
    shutil.copytree(converted["full"], bad)
    config = json.loads((bad / "config.json").read_text())
    config[key] = value
    (bad / "config.json").write_text(json.dumps(config))
    for command in (["eval", bad, "--task", "ppl"], ["generate", bad, "--prompt", "hi"], ["export-onnx", bad, "-o", tmp_path / "o"],
                    ["verify", EXAMPLE, bad]):
        res = run(*command)
        assert res.exit_code == 2 and ("num_attention_heads" in res.output or "hidden_size" in res.output), (command, res.output)


def test_generate_refuses_a_prompt_longer_than_the_model(converted) -> None:
    res = run("generate", converted["full"], "--prompt", "x" * 2046, "--max-new-tokens", "4")
    assert res.exit_code == 2 and "positions" in res.output


@pytest.mark.slow
def test_sigterm_cleans_up_like_ctrl_c(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hydracc", "convert", str(EXAMPLE), "-o", str(out), "--distill",
                             "--steps", "100000", "--distill-samples", "8", "--calib-samples", "8", "--seq-len", "64",
                             "--save-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out.hydracc-distill" / "state.safetensors").exists() and time.monotonic() < deadline:  # training has started
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".hydracc-tmp-" in p.name]
    assert torch.__version__  # keeps the import used
