"""The shipped example model: what it is, that its card's numbers reproduce, and that eval tells it from a broken conversion."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT

from hydracc.convert import convert
from hydracc.evaluation.evaluate import evaluate

MODEL = ROOT / "examples" / "tiny-llama"


def test_shipped_checkpoint_is_a_small_gqa_llama_with_a_card() -> None:
    files = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "eval.json", "training_log.json"} <= files
    assert sum(p.stat().st_size for p in MODEL.iterdir()) <= 20 * 1024 * 1024
    config = json.loads((MODEL / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 256
    assert config["num_attention_heads"] == 8 and config["num_key_value_heads"] == 2
    card = (MODEL / "README.md").read_text()
    scores = json.loads((MODEL / "eval.json").read_text())
    assert f"{scores['mqar']['accuracy']:.1%}" in card and f"{scores['passkey']['accuracy']:.1%}" in card


@pytest.fixture(scope="module")
def original_scores() -> dict:
    return evaluate(MODEL).to_json()


@pytest.mark.slow
def test_card_numbers_reproduce(original_scores) -> None:
    recorded = json.loads((MODEL / "eval.json").read_text())
    for task in ("mqar", "passkey"):
        assert original_scores[task]["accuracy"] == pytest.approx(recorded[task]["accuracy"], abs=0.01)
    assert original_scores["ppl"]["ppl"] == pytest.approx(recorded["ppl"]["ppl"], rel=1e-3)


@pytest.mark.slow
def test_well_above_chance_where_it_was_trained(original_scores) -> None:
    grid = original_scores["mqar"]["grid"]
    assert grid["pairs=4,len=128"] > 0.5 and original_scores["mqar"]["first_query_accuracy"] > 0.3  # chance: 1/64
    assert original_scores["passkey"]["by_length"]["len=128"] > 0.8  # chance: 1e-5
    # recall where a 64-token streaming window cannot reach (the bar: 90% at 1,024 bytes)
    assert original_scores["mqar"]["by_length"]["len=1024"] >= 0.9


@pytest.mark.slow
def test_all_linear_conversion_scores_far_lower(original_scores, tmp_path) -> None:
    convert(MODEL, tmp_path / "linear", full_ratio=0.0, strategy="even", linear_kind="elu")
    broken = evaluate(tmp_path / "linear").to_json()
    assert broken["converted"] is True
    assert broken["mqar"]["accuracy"] < 0.5 * original_scores["mqar"]["accuracy"]
    assert broken["passkey"]["accuracy"] < 0.5 * original_scores["passkey"]["accuracy"]
    assert broken["ppl"]["ppl"] > original_scores["ppl"]["ppl"]


QWEN = ROOT / "examples" / "tiny-qwen"
"""The second example: a Qwen3 with its own vocabulary and recall format, used only through the CLI."""


def _cli(*args: str) -> dict:
    from click.testing import CliRunner

    from hydracc.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_second_example_is_a_qwen3_with_its_own_vocabulary_and_card() -> None:
    files = {p.name for p in QWEN.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "eval.json", "training_log.json",
            "calib.npy", "recall.npz", "quality.json"} <= files
    assert sum(p.stat().st_size for p in QWEN.iterdir()) <= 20 * 1024 * 1024
    config = json.loads((QWEN / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 1024 and config["num_key_value_heads"] == 2
    card = (QWEN / "README.md").read_text()
    scores = json.loads((QWEN / "eval.json").read_text())
    assert f"{scores['recall']['accuracy']:.1%}" in card and f"{scores['ppl']['ppl']:.3f}" in card


@pytest.mark.slow
def test_default_plan_keeps_the_recall_circuit_of_a_model_it_never_saw(tmp_path) -> None:
    """With --calib from its training distribution, the default plan at 25% reaches 90% of the
    recall of the best of all 28 plans (measured by benchmarks/quality.py, in quality.json)."""
    ref = json.loads((QWEN / "quality.json").read_text())
    out = tmp_path / "converted"
    report = _cli("convert", QWEN, "-o", out, "--kv-budget", "0.25", "--calib", QWEN / "calib.npy", "--linear-kind", "elu",
                  "--json", "-q")
    budget = report["plan"]["budget"]
    assert budget["objective"] == "recall" and "objective_fell_back_to_kl" not in budget
    found = report["analysis"]["objective"]
    assert found["recall_positions"] > found["recall_positions_by_pairs"]  # the windowed run finds answers pairs miss
    scores = _cli("eval", out, "--task", "recall", "--recall", QWEN / "recall.npz", "--json", "-q")
    original = json.loads((QWEN / "eval.json").read_text())["recall"]["accuracy"]
    assert scores["recall"]["accuracy"] >= 0.9 * ref["best_of_all"]["recall"], (scores["recall"], ref["best_of_all"])
    expected_random = sum(ref["every_plan"].values()) / len(ref["every_plan"])  # a random plan's exact expectation
    assert scores["recall"]["accuracy"] >= 2 * max(ref["layers"]["recall"], ref["random_mean_of_3"]["recall"], expected_random)
    assert scores["recall"]["accuracy"] < original  # a quarter of the cache costs recall: the probes can tell
