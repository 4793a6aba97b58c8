"""examples/ci: the release workflow's step, run as the workflow runs it, on the example model."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

CI = ROOT / "examples" / "ci"


def _workflow() -> dict:
    return yaml.safe_load((CI / "release.yml").read_text())


def _release_command() -> list[str]:
    steps = _workflow()["jobs"]["release"]["steps"]
    runs = [s["run"] for s in steps if "release.sh" in s.get("run", "")]
    assert len(runs) == 1
    return shlex.split(runs[0])


def test_the_workflow_runs_the_recipe() -> None:
    wf = _workflow()
    assert set(wf["env"]) >= {"MODEL", "PLAN", "PLAN_ARGS", "MAX_PPL_INCREASE", "MIN_RECALL_RATIO", "MIN_AGREEMENT"}
    cmd = _release_command()
    assert cmd[:2] == ["bash", "ci/release.sh"] and cmd[2:4] == ["$MODEL", "$PLAN"]
    assert any("pip install" in s.get("run", "") and "hydracc[onnx]" in s["run"] for s in wf["jobs"]["release"]["steps"])


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = _release_command()
    script = CI / "release.sh"  # ci/release.sh in a model repository
    args = [str(ROOT / "examples" / "tiny-llama"), str(CI / "plan.json"), str(tmp_path / "dist")]
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "PLAN_ARGS": _workflow_env()["PLAN_ARGS"], **env}
    return subprocess.run([cmd[0], str(script), *args], capture_output=True, text=True, env=full_env, timeout=900, cwd=tmp_path)


def _workflow_env() -> dict[str, str]:
    env = {k: str(v) for k, v in _workflow()["env"].items()}
    assert env["PLAN_ARGS"] == "--full-ratio 0.5 --linear-kind elu"  # the shipped plan under review: half the KV groups, elu
    return env


@pytest.mark.slow
def test_release_step_on_the_example_model(tmp_path) -> None:
    loose = {"MAX_PPL_INCREASE": "1.0", "MIN_RECALL_RATIO": "0.5", "MIN_AGREEMENT": "0.5"}
    res = _run(tmp_path, **loose)
    assert res.returncode == 0, res.stderr
    dist = tmp_path / "dist"
    assert json.loads((dist / "convert.json").read_text())["status"] == "ok"
    verify = json.loads((dist / "verify.json").read_text())
    assert verify["passed"] and verify["checks"]["ppl_increase"]["threshold"] == 1.0
    assert json.loads((dist / "onnx.json").read_text())["decoded_tokens"] > 0
    assert (dist / "model" / "onnx" / "decode.onnx").is_file()
    card = (dist / "model" / "README.md").read_text()
    assert "## Verification (`hydracc verify`)" in card and "passed" in card  # the gate's figures in the card
    # the same step with the workflow's own thresholds: this plan does not pass them, and nothing is exported
    (tmp_path / "strict").mkdir()
    thresholds = {k: v for k, v in _workflow_env().items() if k.startswith(("MAX_", "MIN_"))}
    strict = _run(tmp_path / "strict", **thresholds)
    assert strict.returncode == 3, strict.stderr
    assert not (tmp_path / "strict" / "dist" / "onnx.json").exists()
    assert json.loads((tmp_path / "strict" / "dist" / "verify.json").read_text())["passed"] is False


@pytest.mark.slow
def test_a_stale_plan_stops_the_release(tmp_path) -> None:
    res = _run(tmp_path, PLAN_ARGS="--full-ratio 0.25")
    assert res.returncode == 1 and "is stale" in res.stderr
    assert not (tmp_path / "dist" / "model").exists()
