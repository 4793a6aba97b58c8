"""The release gate: verify a converted checkpoint against the original it came from."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ROOT

from hydracc.convert import convert
from hydracc.evaluation.probes import ProbeError
from hydracc.evaluation.verify import Thresholds, VerifyError, VerifySettings, verify

EXAMPLE = ROOT / "examples" / "tiny-llama"
FAST = VerifySettings(samples=4, seq_len=64, recall_samples=8, recall_pairs=(4,))


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    convert(EXAMPLE, root / "full", full_ratio=1.0, strategy="even")
    convert(EXAMPLE, root / "linear", full_ratio=0.0, strategy="even", linear_kind="elu")
    return root


def test_an_all_full_conversion_passes_with_identical_predictions(conversions) -> None:
    report = verify(EXAMPLE, conversions / "full", settings=FAST, device="cpu")
    assert report.passed, report.checks
    assert report.figures["agreement"] == 1.0 and report.figures["ppl_increase"] == 0.0
    assert report.figures["recall_probe"] == "mqar (byte level)" and report.checks["recall_ratio"]["judged"]
    assert report.to_json()["passed"] is True and report.device == "cpu"


def test_an_all_linear_conversion_fails_the_gate(conversions) -> None:
    report = verify(EXAMPLE, conversions / "linear", settings=FAST, device="cpu")
    assert not report.passed
    assert not report.checks["ppl_increase"]["ok"] and report.figures["ppl"]["converted"] > report.figures["ppl"]["original"]
    loose = verify(EXAMPLE, conversions / "linear", settings=FAST, device="cpu",
                   thresholds=Thresholds(max_ppl_increase=100, min_recall_ratio=0, min_agreement=0))
    assert loose.passed  # the same figures against other thresholds
    assert loose.figures == report.figures  # fixed seeds: the same numbers twice


def test_pairs_that_do_not_belong_together_are_refused(conversions, tiny_checkpoint) -> None:
    with pytest.raises(VerifyError, match="was not converted from") as info:
        verify(tiny_checkpoint("llama-gqa"), conversions / "full", settings=FAST)
    assert info.value.exit_code == 2
    with pytest.raises(VerifyError, match="itself a converted checkpoint"):
        verify(conversions / "full", conversions / "linear", settings=FAST)
    with pytest.raises(Exception, match="no 'hydra' section"):
        verify(EXAMPLE, EXAMPLE, settings=FAST)


def test_other_vocabularies_need_their_tokens(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("qwen3-mqa")  # vocab 64, no tokenizer
    convert(src, tmp_path / "conv", full_ratio=1.0, strategy="even")
    with pytest.raises(ProbeError, match="no tokenizer.json"):
        verify(src, tmp_path / "conv", settings=FAST)
    ids = np.random.default_rng(0).integers(0, 64, size=(4, 64))
    np.save(tmp_path / "ids.npy", ids)
    report = verify(src, tmp_path / "conv", calib=tmp_path / "ids.npy", settings=FAST, device="cpu")
    assert report.figures["agreement"] == 1.0 and report.figures["recall_probe"] == "key-value recall in the model's ids"
    # a random model cannot recall: the ratio is reported, not judged, and does not decide the gate
    assert report.checks["recall_ratio"]["judged"] is False and report.passed


@pytest.mark.parametrize("bad", [{"max_ppl_increase": -1}, {"min_agreement": 2}, {"min_recall_ratio": float("nan")}, {"min_agreement": "0.5"}])
def test_thresholds_are_checked(bad) -> None:
    with pytest.raises(VerifyError):
        Thresholds(**bad)


def test_update_card_writes_the_figures_once(conversions, tmp_path) -> None:
    """--update-card puts the figures before "How to load", replaces them on a second run, keeps the
    rest of the card and its mode; a folder without hydracc's card is refused before any model runs."""
    import shutil

    from click.testing import CliRunner

    from hydracc.cli import main
    from hydracc.evaluation.verify import update_card

    conv = tmp_path / "full"
    shutil.copytree(conversions / "full", conv)
    card = conv / "README.md"
    before = card.read_text()
    mode = card.stat().st_mode
    report = verify(EXAMPLE, conv, settings=FAST, device="cpu")
    update_card(conv, report)
    text = card.read_text()
    assert text.count("## Verification (`hydracc verify`)") == 1 and "| agreement | 1 |" in text
    assert text.index("## Verification") < text.index("## How to load")
    report.checks["agreement"]["value"] = 0.5  # a second run replaces the section
    update_card(conv, report)
    again = card.read_text()
    assert again.count("## Verification") == 1 and "| agreement | 0.5 |" in again and "| agreement | 1 |" not in again
    start, end = again.index("<!-- hydracc verify: begin -->"), again.index("## How to load")
    assert again[:start] + again[end:] == before  # nothing else of the card changed
    assert card.stat().st_mode == mode and not [p for p in conv.iterdir() if p.name.startswith(".")]
    (conv / "README.md").write_text("my own card\n")
    res = CliRunner().invoke(main, ["verify", str(EXAMPLE), str(conv), "--update-card", "--samples", "2"])
    assert res.exit_code == 2 and "not a model card hydracc wrote" in res.output
    assert (conv / "README.md").read_text() == "my own card\n"
