"""Conversions of the example model against values recorded before the restructure.

Each case converts ``examples/tiny-llama`` through the public CLI with fixed arguments. Tensors
copied from the input (possibly with rows reordered) and every side file must be byte-identical:
their sha256 is compared. What the conversion *computes* in floating point (the ``hydra.*``
parameters measured or trained on calibration data, and the scores, losses and cache figures in
``config.json``) depends on the CPU's vector units (AVX-512 and AVX2 machines sum in different
orders), so those are recorded as values and compared within ``RTOL``; everything else in
``config.json`` (kinds, head order, plan decisions, names) must match exactly. A change that
alters outputs on purpose re-records them (``HYDRACC_RECORD_GOLDEN=1 pytest
tests/test_golden_outputs.py``) and says why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

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
    "layers-fusion-nopermute": ["--strategy", "layers", "--linear-kind", "elu", "--fusion", "--no-permute", *SMALL],
    "distill": ["--strategy", "random", "--seed", "3", "--distill", "--steps", "3", "--e2e-steps", "2",
                "--distill-samples", "8", "--distill-batch", "4", *SMALL],
}


RTOL = 1e-3
"""Relative tolerance for computed floats (plus ``ATOL`` for values near zero)."""
ATOL = 1e-6


def _split_floats(obj: Any, floats: list[float]) -> Any:
    """``obj`` with every float replaced by a marker, the floats appended to ``floats`` in order."""
    if isinstance(obj, float):
        floats.append(float(f"{obj:.7g}"))
        return "<float>"
    if isinstance(obj, dict):
        return {k: _split_floats(obj[k], floats) for k in sorted(obj)}
    if isinstance(obj, list):
        return [_split_floats(v, floats) for v in obj]
    return obj


def output_record(out: Path) -> dict[str, Any]:
    """What the test compares: exact hashes for copied data, values for computed floats."""
    import torch

    record: dict[str, Any] = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                meta = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
                if ".hydra." in name:  # computed on calibration data
                    record[f"tensor:{name}"] = {"meta": meta, "values": [float(f"{v:.7g}") for v in t.double().flatten().tolist()]}
                else:
                    digest = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                    record[f"tensor:{name}"] = f"{meta}:{digest}"
    config = json.loads((out / "config.json").read_text())
    config.get("hydra", {}).pop("provenance", None)
    config.get("hydra", {}).pop("tensor_sha256", None)  # digests of the tensors compared above (learned ones within RTOL)
    floats: list[float] = []
    skeleton = _split_floats(config, floats)
    record["config.json"] = {"skeleton": hashlib.sha256(json.dumps(skeleton).encode()).hexdigest(), "floats": floats}
    for side in sorted(p.name for p in out.iterdir() if p.suffix != ".safetensors" and p.name != "config.json"):
        record[f"file:{side}"] = hashlib.sha256((out / side).read_bytes()).hexdigest()
    return record


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) <= RTOL * max(abs(a), abs(b)) + ATOL for a, b in zip(got, want))


def differences(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    changed = []
    for key, w in want.items():
        g = got[key]
        if isinstance(w, str) or isinstance(g, str):
            same = g == w
        elif "skeleton" in w:
            same = g["skeleton"] == w["skeleton"] and _close(g["floats"], w["floats"])
        else:
            same = g["meta"] == w["meta"] and _close(g["values"], w["values"])
        if not same:
            changed.append(key)
    return changed


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_conversion_matches_recorded_hashes(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(EXAMPLE), "-o", str(out), "-q", *CASES[case]], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = output_record(out)
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("HYDRACC_RECORD_GOLDEN") == "1":
        recorded[case] = got
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert case in recorded, f"no recorded hashes for {case}: run with HYDRACC_RECORD_GOLDEN=1"
    want = recorded[case]
    assert sorted(got) == sorted(want), "the output files or tensor names changed"
    changed = differences(got, want)
    assert not changed, f"outputs differ from the recorded conversion: {changed}"
