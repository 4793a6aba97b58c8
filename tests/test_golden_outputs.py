"""Conversions of the example model, byte for byte against hashes recorded before the restructure.

Each case converts ``examples/tiny-llama`` through the public CLI with fixed arguments and
compares the sha256 of every output tensor (with its dtype and shape) and of ``config.json``
without its provenance block against ``tests/golden/conversions.json``. A change that alters
outputs on purpose re-records them (``HYDRACC_RECORD_GOLDEN=1 pytest tests/test_golden_outputs.py``)
and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ROOT
from safetensors import safe_open

from hydracc.cli import main

GOLDEN = Path(__file__).parent / "golden" / "conversions.json"
EXAMPLE = ROOT / "examples" / "tiny-llama"
SMALL = ["--calib-samples", "8", "--seq-len", "64"]

CASES = {
    "default": [],
    "even-hedgehog": ["--strategy", "even", "--linear-kind", "hedgehog", *SMALL],
    "heads-gdn": ["--linear-kind", "gdn", "--full-ratio", "0.5", *SMALL],
    "streaming-keep": ["--linear-kind", "streaming", "--sink", "2", "--window", "16", "--keep-full", "3.0", *SMALL],
    "layers-fusion-nopermute": ["--strategy", "layers", "--fusion", "--no-permute", *SMALL],
    "distill": ["--strategy", "random", "--seed", "3", "--distill", "--steps", "3", "--e2e-steps", "2",
                "--distill-samples", "8", "--distill-batch", "4", *SMALL],
}


def output_hashes(out: Path) -> dict[str, str]:
    hashes: dict[str, str] = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                digest = hashlib.sha256(t.view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()
                hashes[f"tensor:{name}"] = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}:{digest}"
    config = json.loads((out / "config.json").read_text())
    config.get("hydra", {}).pop("provenance", None)
    hashes["config.json"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    for side in sorted(p.name for p in out.iterdir() if p.suffix != ".safetensors" and p.name != "config.json"):
        hashes[f"file:{side}"] = hashlib.sha256((out / side).read_bytes()).hexdigest()
    return hashes


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_conversion_matches_recorded_hashes(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-o", str(out), "-q", *CASES[case]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = output_hashes(out)
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("HYDRACC_RECORD_GOLDEN") == "1":
        recorded[case] = got
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert case in recorded, f"no recorded hashes for {case}: run with HYDRACC_RECORD_GOLDEN=1"
    want = recorded[case]
    assert sorted(got) == sorted(want), "the output files or tensor names changed"
    changed = [k for k in want if got[k] != want[k]]
    assert not changed, f"outputs differ from the recorded conversion: {changed}"
