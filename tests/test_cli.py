"""The command line: dry run, conversion, JSON reports, and clear errors with exit code 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ROOT

from hydracc.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_the_commands() -> None:
    res = run("--help")
    assert res.exit_code == 0
    for command in ("convert", "analyze", "eval", "generate", "export-onnx", "passes"):
        assert f"  {command} " in res.output


def test_plan_dry_run_lists_sites_and_writes_nothing(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    before = sorted(p.name for p in src.iterdir())
    res = run("convert", src, "--plan", "--plan-out", tmp_path / "plan.json")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "model.layers.1.self_attn" in out and "GQA" in out and "causal" in out
    assert "KV cache per token" in out and "before" in out and "after" in out
    assert json.loads((tmp_path / "plan.json").read_text())["format"] == "hydracc-plan"
    assert sorted(p.name for p in src.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_plan_json_report(tiny_checkpoint) -> None:
    res = CliRunner().invoke(main, ["convert", str(tiny_checkpoint("gpt2-mha")), "--plan", "--json", "--full-ratio", "0.5"])
    assert res.exit_code == 0
    report = json.loads(res.stdout)
    assert report["status"] == "ok" and report["mode"] == "plan" and report["model_type"] == "gpt2"
    assert [s["num_heads"] for s in report["sites"]] == [4, 4]
    kv = report["kv_cache"]
    assert kv["bytes_per_token_after"] == kv["bytes_per_token_before"] // 2


def test_convert_then_plan_file_round_trip(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("qwen2-mha")
    assert run("convert", src, "--plan", "--plan-out", tmp_path / "p.json", "--full-ratio", "0.75").exit_code == 0
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", tmp_path / "p.json", "-q")
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    saved = config["hydra"]["plan"]
    assert saved["budget"].pop("source") == "plan_file"  # its counts checked against the heads, so the record is kept
    assert saved == json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_existing_output_needs_force(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("convert", src, "-o", out)
    assert res.exit_code == 2 and "already exists" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    res = run("convert", src, "-o", out, "--force", "-q")  # not hydracc's folder: --force does not remove it
    assert res.exit_code == 2 and "hydracc did not write it" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert run("convert", src, "-o", out, "-q", "--force").exit_code == 0  # an empty folder may go
    res = run("convert", src, "-o", out, "--force", "-q", "--full-ratio", "0.5")  # and so may hydracc's own output
    assert res.exit_code == 0 and (out / "config.json").exists()


def test_output_may_not_replace_the_input(tiny_checkpoint, tmp_path) -> None:
    src = _copy(tiny_checkpoint("llama-gqa"), tmp_path / "in")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for target in (src, tmp_path):
        res = run("convert", src / "model.safetensors", "-o", target, "--force")
        assert res.exit_code == 2 and "would replace the input" in res.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _wrong_heads(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (d / "config.json").write_text(json.dumps(cfg))


def _unknown_type(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "hydra-unknown-arch"
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "model.safetensors"),
        (_wrong_heads, "k_proj.weight has shape"),
        (_unknown_type, "hydra-unknown-arch"),
    ],
    ids=["truncated-safetensors", "head-count-mismatch", "unknown-model-type"],
)
def test_bad_input_exit_2_output_untouched(tiny_checkpoint, tmp_path, damage, message: str) -> None:
    src = _copy(tiny_checkpoint("llama-gqa"), tmp_path / "in")
    damage(src)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--json"])
    assert res.exit_code == 2, res.output
    error = json.loads(res.stdout)
    assert error["status"] == "error" and error["exit_code"] == 2 and message in error["error"]
    assert "Traceback" not in res.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_plan_naming_missing_head_exit_2(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    assert run("convert", src, "--plan", "--plan-out", tmp_path / "p.json", "-q").exit_code == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["layers"][1]["heads"].append({"kind": "full"})  # a 5th head in a 4-head layer
    (tmp_path / "p.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    res = run("convert", src, "-o", out, "--plan-file", tmp_path / "p.json")
    assert res.exit_code == 2
    assert "plan.layers[1].heads: has 5 entries but num_heads is 4" in res.output
    assert not out.exists()


def test_no_output_and_no_plan_is_a_usage_error(tiny_checkpoint) -> None:
    res = run("convert", tiny_checkpoint("llama-gqa"))
    assert res.exit_code == 2 and "give -o OUTPUT" in res.output


def test_missing_path(tmp_path) -> None:
    res = run("convert", tmp_path / "nope", "--plan")
    assert res.exit_code == 2 and "nope" in res.output


def test_custom_pass_plugin(tiny_checkpoint, tmp_path) -> None:
    res = run("passes", "--plugin", ROOT / "examples" / "custom_pass.py")
    assert res.exit_code == 0 and "keep-ends-full" in res.output and "fold-gqa" in res.output
    src = tiny_checkpoint("llama-gqa")
    res = run("convert", src, "-o", tmp_path / "out", "--full-ratio", "0", "--plugin", ROOT / "examples" / "custom_pass.py",
              "--pass", "keep-ends-full", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["passes"] == ["fold-gqa", "hybridize", "keep-ends-full", "permute-heads"]
    layers = json.loads((tmp_path / "out" / "config.json").read_text())["hydra"]["layers"]
    assert [set(entry["kinds"]) for entry in layers] == [{"full"}, {"full"}]  # both layers are ends; plan said all elu


def test_unknown_pass_exit_2(tiny_checkpoint, tmp_path) -> None:
    res = run("convert", tiny_checkpoint("llama-gqa"), "-o", tmp_path / "out", "--pass", "nope")
    assert res.exit_code == 2 and "no pass named 'nope'" in res.output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_custom_pass_example_script(tiny_checkpoint, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_pass.py"), str(tiny_checkpoint("gpt2-mha")), str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "keep-ends-full" in proc.stdout and (tmp_path / "o" / "config.json").exists()


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path) -> None:
    exe = shutil.which("hydracc", path=os.path.dirname(sys.executable)) or shutil.which("hydracc")
    assert exe, "the hydracc console script is not installed"
    ck = tmp_path / "ck"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_checkpoint.py"), str(ck), "--layers", "2",
                    "--hidden", "64", "--heads", "4", "--kv-heads", "2"], check=True, capture_output=True, timeout=300)
    proc = subprocess.run([exe, "convert", str(ck / "model.safetensors"), "--plan", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mode"] == "plan"
    proc = subprocess.run([exe, "convert", str(ck), "-o", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "out" / "config.json").exists()
    proc = subprocess.run([exe, "convert", str(ck), "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert subprocess.run([exe, "--help"], capture_output=True, timeout=60).returncode == 0


def test_analyze_json_scores_every_head(tiny_checkpoint) -> None:
    res = CliRunner().invoke(main, ["analyze", str(tiny_checkpoint("llama-gqa")), "--json", "--calib-samples", "3", "--seq-len", "24"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["unit"] == "kv_group" and report["calibration"]["samples"] == 3
    layer = report["layers"][0]
    assert len(layer["heads"]) == 4 and len(layer["unit_sensitivity"]) == 2
    assert set(layer["heads"][0]) == {"retrieval", "distance", "sink", "entropy", "linear_error", "sensitivity", "recall",
                                      "priority"}
    assert sorted(p for layer in report["layers"] for p in layer["unit_priority"]) == list(range(4))
    assert report["objective"]["name"] == "recall" and 0 <= report["objective"]["stability"]["agree"] <= 1
    # units are named as plans and --keep-full name them: layer.head of the group's first query head (0 or 2 here)
    joint, margin = report["objective"]["joint"], report["objective"]["stability"]["margin"]
    names = joint["window"] + [margin["kept"], margin["dropped"]]
    assert sorted(joint["window"]) == ["0.0", "0.2", "1.0", "1.2"] and set(names) <= set(joint["window"])


def test_plan_with_scores_png_and_strategies(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    res = run("convert", src, "--plan", "--calib-samples", "2", "--seq-len", "16", "--plan-out", tmp_path / "p.json",
              "--plan-png", tmp_path / "p.png", "--keep-full", "1.3")
    assert res.exit_code == 0, res.output
    assert "Head scores and decisions" in res.output and "sensitivity" in res.output and "budget (--full-ratio 0.25)" in res.output
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["budget"]["strategy"] == "heads" and plan["budget"]["keep_full"] == ["1.3"]
    assert plan["layers"][1]["heads"][3]["kind"] == "full" and "scores" in plan["layers"][1]["heads"][3]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    for strategy in ("layers", "random", "even"):
        res = CliRunner().invoke(main, ["convert", str(src), "--plan", "--json", "--strategy", strategy, "--kv-budget", "0.5"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert report["plan"]["budget"]["strategy"] == strategy and report["analysis"] is None
        assert report["kv_cache"]["ratio"] == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--full-ratio", "0.5", "--kv-budget", "0.5"], "not both"),
        (["--keep-full", "7.0"], "no layer 7"),
        (["--calib", "missing.txt"], "does not exist"),
        (["--min-full-per-layer", "3", "--strategy", "even"], "min-full-per-layer"),
    ],
)
def test_planning_errors_exit_2(tiny_checkpoint, args, message) -> None:
    res = run("convert", tiny_checkpoint("llama-gqa"), "--plan", "--calib-samples", "2", "--seq-len", "16", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_calibration_longer_than_the_model_is_refused(tiny_checkpoint) -> None:
    res = run("analyze", tiny_checkpoint("gpt2-mha"), "--seq-len", "4096")
    assert res.exit_code == 2 and "positions" in res.output


@pytest.mark.slow
def test_convert_with_distillation_json_and_resume_errors(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    out = tmp_path / "out"
    res = run("convert", src, "-o", out, "--strategy", "even", "--full-ratio", "0.5", "--linear-kind", "gdn", "--distill",
              "--steps", "3", "--e2e-steps", "1", "--distill-samples", "4", "--seq-len", "16", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["distill"]["settings"]["steps"] == 3
    assert set(report["distill"]["losses"]) == {"attention_transfer.layer0", "attention_transfer.layer1", "kl"}
    config = json.loads((out / "config.json").read_text())
    assert config["hydra"]["distill"] == report["distill"]
    assert config["hydra"]["plan"]["fusion"] is True
    assert not (tmp_path / "out.hydracc-distill").exists()
    # --resume with no saved state: a clear error, nothing written
    res = run("convert", src, "-o", tmp_path / "again", "--strategy", "even", "--linear-kind", "gdn", "--distill", "--resume",
              "--seq-len", "16", "--distill-samples", "4")
    assert res.exit_code == 2 and "no distillation state" in res.output
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--linear-kind", "elu", "--sink", "4"], "--linear-kind streaming"),
        (["--resume"], "add --distill"),
        (["--distill", "--no-fusion"], "drop --no-fusion"),
        (["--linear-kind", "full"], "Invalid value for '--linear-kind'"),
        (["--linear-kind", "hedgehog", "--no-fusion"], "always come with fusion"),
        (["--linear-kind", "streaming", "--distill"], "nothing to train"),
        pytest.param(["--distill", "--device", "cuda:0"], "no CUDA device",
                     marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
        (["--distill", "--device", "potato"], "--device 'potato'"),
    ],
    ids=["sink-without-streaming", "resume-without-distill", "distill-no-fusion", "full-kind", "learned-no-fusion",
         "distill-streaming", "no-cuda", "bad-device"],
)
def test_bad_kind_and_distill_options(tiny_checkpoint, tmp_path, args, message) -> None:
    res = run("convert", tiny_checkpoint("llama-gqa"), "-o", tmp_path / "out", "--strategy", "even", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_streaming_plan_dry_run(tiny_checkpoint) -> None:
    res = run("convert", tiny_checkpoint("llama-gqa"), "--plan", "--json", "--strategy", "even", "--full-ratio", "0.5",
              "--linear-kind", "streaming", "--sink", "2", "--window", "8")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    kinds = [h for lp in report["plan"]["layers"] for h in lp["heads"]]
    assert {"kind": "streaming", "params": {"sink": 2, "window": 8}} in kinds
    assert report["kv_cache"]["bytes_per_token_after"] == report["kv_cache"]["bytes_per_token_before"] // 2
