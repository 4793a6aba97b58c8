"""Two real processes through torch.distributed (gloo, torchrun) against one: the same plan and parameters.

Each process analyzes and trains on its share of the calibration rows; sums and gradients are
added up over processes, so two processes take the steps one process takes on all rows. The
learned values agree to float32 rounding: within 1e-5 of each tensor's scale for gdn (the
HydraHead kind); hedgehog's bias, whose gradient is a near-cancelling sum that Adam then
normalizes, to about 2e-5, checked at 1e-4.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = ["--strategy", "heads", "--distill", "--distill-samples", "6", "--distill-batch", "4", "--calib-samples", "6",
          "--seq-len", "16", "-q"]


def _hydracc(*args: str, procs: int = 1, wait: bool = True, cwd: Path | None = None) -> subprocess.Popen | subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if procs == 1:
        cmd = [sys.executable, "-m", "hydracc", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", "-m", "hydracc", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _learned(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(out / "model.safetensors")).items() if ".hydra." in k}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert sorted(a) == sorted(b) and a
    for name in a:
        scale = float(a[name].abs().max().clamp_min(1e-12))
        assert float((a[name] - b[name]).abs().max()) <= rel * scale, (name, float((a[name] - b[name]).abs().max()) / scale)


@pytest.mark.parametrize(("kind", "rel"), [("gdn", 1e-5), ("hedgehog", 1e-4)])
def test_two_processes_learn_what_one_learns(tiny_checkpoint, tmp_path, kind, rel) -> None:
    src = str(tiny_checkpoint("llama-gqa"))
    args = [*COMMON, "--linear-kind", kind, "--steps", "4", "--e2e-steps", "3", "--seq-len", "48"]
    one = _hydracc("convert", src, "-o", str(tmp_path / "one"), *args, "--json")
    assert one.returncode == 0, one.stderr
    two = _hydracc("convert", src, "-o", str(tmp_path / "two"), *args, "--json", procs=2)
    assert two.returncode == 0, two.stderr
    report = json.loads(two.stdout)  # rank 0 alone printed: one JSON document
    single = json.loads(one.stdout)["analysis"]
    assert report["status"] == "ok" and report["analysis"]["sensitivity"]["recall_positions"] > 0
    for key in ("recall_positions", "recall_positions_by_pairs", "original_recall_accuracy"):  # summed over the ranks
        assert report["analysis"]["objective"][key] == single["objective"][key], key
    assert report["analysis"]["objective"]["stability"] == single["objective"]["stability"]  # per-row values gathered
    _close(_learned(tmp_path / "one"), _learned(tmp_path / "two"), rel)
    c1, c2 = (json.loads((tmp_path / d / "config.json").read_text())["hydra"] for d in ("one", "two"))
    assert [lp["kinds"] for lp in c1["layers"]] == [lp["kinds"] for lp in c2["layers"]]  # the same plan from split rows
    s1 = [h["scores"]["sensitivity"] for lp in c1["plan"]["layers"] for h in lp["heads"]]
    s2 = [h["scores"]["sensitivity"] for lp in c2["plan"]["layers"] for h in lp["heads"]]
    assert s1 == pytest.approx(s2, rel=1e-4, abs=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # rank 1 wrote nothing, no state left


def test_an_interrupted_two_process_run_resumes(tiny_checkpoint, tmp_path) -> None:
    src = str(tiny_checkpoint("llama-gqa"))
    args = [*COMMON, "--linear-kind", "gdn", "--steps", "400", "--save-every", "5"]
    ref = _hydracc("convert", src, "-o", str(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr
    proc = _hydracc("convert", src, "-o", str(tmp_path / "out"), *args, procs=2, wait=False)
    state = tmp_path / "out.hydracc-distill" / "state.safetensors"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first saved state; give it more steps"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and state.exists() and not (tmp_path / "out").exists()
    resumed = _hydracc("convert", src, "-o", str(tmp_path / "out"), *args, "--resume", procs=2)
    assert resumed.returncode == 0, resumed.stderr
    _close(_learned(tmp_path / "ref"), _learned(tmp_path / "out"), 1e-5)
    assert not state.parent.exists()
