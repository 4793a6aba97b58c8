"""SmolLM2-135M, when ``python benchmarks/real_models.py fetch smollm2`` has put it in the cache (skipped otherwise)."""

import importlib.util
import sys

import pytest
from helpers import ROOT

from hydracc.evaluation.evaluate import EvalSettings, evaluate
from hydracc.evaluation.text_eval import TextSettings


def _real_models():
    spec = importlib.util.spec_from_file_location("real_models", ROOT / "benchmarks" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


real_models = _real_models()
SMOLLM2 = real_models.model_dir("smollm2")
needs_smollm2 = pytest.mark.skipif(real_models.check_folder(SMOLLM2) is not None,
                                   reason=f"SmolLM2 not fetched into {SMOLLM2} (benchmarks/real_models.py fetch smollm2)")


@pytest.mark.slow
@needs_smollm2
def test_fetch_twice_does_nothing(capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in SMOLLM2.iterdir()}
    assert real_models.fetch("smollm2") == SMOLLM2
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in SMOLLM2.iterdir()} == before


@pytest.mark.slow
@needs_smollm2
def test_smollm2_reads_prose_and_recalls() -> None:
    settings = EvalSettings(text=TextSettings(prose_windows=2, prose_seq_len=256, passkey_lengths=(1024,),
                                              kv_lengths=(1024,), samples=2))
    res = evaluate(SMOLLM2, ("prose", "passkey_gen", "kv_lookup"), settings).to_json()
    assert res["tokens"] == "the checkpoint's tokenizer.json" and res["prose"]["bos"] is False
    assert res["prose"]["ppl"] < 40  # measured 17.8 (benchmarks/README.md); a broken load is in the thousands
    assert res["passkey_gen"]["by_length"]["len=1024"] >= 0.5 and res["kv_lookup"]["by_length"]["len=1024"] >= 0.5
