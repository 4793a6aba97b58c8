"""Nothing of the user's is lost or silently misread (issue 30, second round of hostile inputs).

The distillation state folder is hydracc's only by its marker; ``--plan-out``/``--plan-png`` never
replace a file without ``--force`` nor write into the input; ``verify --update-card`` replaces only
what it wrote; a plan file's budget is checked and recounted, its planning options are not silently
ignored, and a plan made for another model is refused; a damaged state under ``--resume`` is a clear
error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hydracc.cli import main
from hydracc.distill.state import state_dir_for

DISTILL = ["--distill", "--steps", "2", "--distill-samples", "4", "--calib-samples", "4", "--seq-len", "16",
           "--save-every", "1", "-q"]


def _state():
    """The state module's names this change added (imported in the tests, so the rest runs on older code)."""
    from hydracc.distill import state

    return state.MARKER, state.TrainingState, state.read_owner


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def src(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of a tiny GQA Llama (tests below write beside and into it)."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama-gqa"), dest)
    return dest


# --- 1. the distillation state folder ---------------------------------------------------------------

def test_a_user_folder_named_like_the_state_is_refused_and_kept(src, tmp_path) -> None:
    state = tmp_path / "r" / "out.hydracc-distill"
    state.mkdir(parents=True)
    (state / "notes.txt").write_text("precious")
    res = run("convert", src, "-o", tmp_path / "r" / "out", *DISTILL)
    assert res.exit_code == 2, res.output
    assert "not hydracc's" in res.output and str(state) in res.output.replace("\n", "")
    assert (state / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in state.iterdir()) == ["notes.txt"] and not (tmp_path / "r" / "out").exists()


def test_a_successful_distill_removes_only_its_own_state(src, tmp_path) -> None:
    MARKER, TrainingState, read_owner = _state()
    out = tmp_path / "out"
    res = run("convert", src, "-o", out, *DISTILL)
    assert res.exit_code == 0, res.output
    assert not state_dir_for(out).exists() and (out / "config.json").is_file()
    # a file the user put into hydracc's own state folder survives the clean-up (and so does the folder)
    st = TrainingState(state_dir_for(tmp_path / "again"), "fp")
    st.claim()
    (st.dir / "mine.txt").write_text("keep")
    st.release()
    assert sorted(p.name for p in st.dir.iterdir()) == ["mine.txt"]


def test_a_live_run_owns_its_state(tmp_path) -> None:
    """A second run to the same output is refused while the first one's process lives; a dead one's state is taken over."""
    MARKER, TrainingState, read_owner = _state()
    folder = state_dir_for(tmp_path / "out")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.mkdir()
        import socket

        (folder / MARKER).write_text(json.dumps({"format": "hydracc-distill-state", "pid": sleeper.pid,
                                                 "host": socket.gethostname(), "started": 0}))
        from hydracc.errors import OutputError

        with pytest.raises(OutputError, match=f"another hydracc run \\(pid {sleeper.pid}\\)"):
            TrainingState(folder, "fp").claim()
        assert read_owner(folder)["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    TrainingState(folder, "fp").claim()  # its process is gone: the state is ours now
    assert read_owner(folder)["pid"] == os.getpid()
    TrainingState(folder, "fp").release()
    assert not folder.exists()


def test_a_state_folder_that_is_a_file_or_a_link_is_refused(tmp_path) -> None:
    MARKER, TrainingState, read_owner = _state()
    from hydracc.errors import OutputError

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "data").write_text("x")
    link = state_dir_for(tmp_path / "out")
    link.symlink_to(target)
    with pytest.raises(OutputError, match="is not a distillation state folder"):
        TrainingState(link, "fp").claim()
    assert (target / "data").read_text() == "x"


# --- 13. a damaged state under --resume ---------------------------------------------------------------

def test_resume_from_a_truncated_state_is_a_clear_error(src, tmp_path) -> None:
    MARKER, TrainingState, read_owner = _state()
    out = tmp_path / "out"
    st = TrainingState(state_dir_for(out), "fp")
    st.claim()
    import torch

    st.save({"a": torch.ones(1000)}, None, [], {"stage": 1})
    path = st.dir / TrainingState.FILE
    path.write_bytes(path.read_bytes()[:200])  # cut in the middle of the tensor data
    # leave it as a killed run would: the marker names a process that is gone
    owner = read_owner(st.dir)
    owner["pid"] = 2**22 + 12345
    (st.dir / MARKER).write_text(json.dumps(owner))
    res = run("convert", src, "-o", out, *DISTILL, "--resume")
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert "damaged or truncated" in text and TrainingState.FILE in text and "without --resume" in text
    assert "Traceback" not in res.output and not out.exists()
    assert path.is_file()  # the user decides what to do with it


def test_resume_without_a_state_fails_before_the_work(src, tmp_path) -> None:
    res = run("convert", src, "-o", tmp_path / "out", *DISTILL, "--resume")
    assert res.exit_code == 2 and "no distillation state" in res.output, res.output
    assert not state_dir_for(tmp_path / "out").exists()


# --- 2. --plan-out / --plan-png ---------------------------------------------------------------------

def test_plan_out_never_replaces_a_file_without_force(src, tmp_path) -> None:
    target = tmp_path / "plan.json"
    target.write_text("my notes")
    res = run("convert", src, "--plan", "--strategy", "even", "--plan-out", target, "-q")
    assert res.exit_code == 2 and "already exists" in res.output and "--force" in res.output, res.output
    assert target.read_text() == "my notes"
    res = run("convert", src, "--plan", "--strategy", "even", "--plan-out", target, "--force", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(target.read_text())["format"] == "hydracc-plan"


def test_plan_png_never_replaces_a_file_without_force(src, tmp_path) -> None:
    target = tmp_path / "plan.png"
    target.write_bytes(b"my picture")
    res = run("convert", src, "--plan", "--strategy", "even", "--plan-png", target, "-q")
    assert res.exit_code == 2 and "already exists" in res.output, res.output
    assert target.read_bytes() == b"my picture"


@pytest.mark.parametrize("name", ["config.json", "plan.json", "model.safetensors"])
def test_plan_out_never_writes_into_the_input(src, name) -> None:
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for extra in ([], ["--force"]):
        res = run("convert", src, "--plan", "--strategy", "even", "--plan-out", src / name, *extra, "-q")
        assert res.exit_code == 2 and "inside the input" in res.output, res.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_plan_out_beside_a_single_file_input(src, tmp_path) -> None:
    """A .safetensors file input: its own files are refused, a new file beside it is fine."""
    weights = src / "model.safetensors"
    res = run("convert", weights, "--plan", "--strategy", "even", "--plan-out", src / "config.json", "--force", "-q")
    assert res.exit_code == 2 and "inside the input" in res.output, res.output
    res = run("convert", weights, "--plan", "--strategy", "even", "--plan-out", src / "new-plan.json", "-q")
    assert res.exit_code == 0, res.output


def test_plan_out_and_plan_png_to_one_file(src, tmp_path) -> None:
    res = run("convert", src, "--plan", "--strategy", "even", "--plan-out", tmp_path / "p", "--plan-png", tmp_path / "p", "-q")
    assert res.exit_code == 2 and "same file" in res.output, res.output


# --- 3. verify --update-card ------------------------------------------------------------------------

def test_update_card_keeps_a_verification_heading_of_the_original_card() -> None:
    from hydracc.emit.model_card import ORIGINAL_HEADING, VERIFY_HEADING, with_verification

    ours = "---\ntags:\n- \"hydracc\"\n---\n# m\n\n## Plan\n\nx\n\n## How to load\n\ncode\n"
    original = f"# The base model\n\n{VERIFY_HEADING}\n\nthe user's own findings\n\n## Verification\n\nmore of theirs\n"
    card = f"{ours}\n{ORIGINAL_HEADING}\n\n{original}"
    report = {"data": "held-out text", "passed": True, "checks": {"agreement": {"value": 0.9, "threshold": 0.8, "ok": True}}}
    once = with_verification(card, report)
    twice = with_verification(once, {**report, "passed": False})
    for text in (once, twice):
        assert text.endswith(original) and "the user's own findings" in text and "more of theirs" in text
        kept = text.split(ORIGINAL_HEADING)[0]
        assert kept.count(VERIFY_HEADING) == 1 and kept.index(VERIFY_HEADING) < kept.index("## How to load")
    assert ": failed." in twice and ": passed." not in twice.split(ORIGINAL_HEADING)[0]


# --- 5, 8. plan files: conflicting options, recounted budgets, another model's plan --------------------------

@pytest.fixture
def plan_file(src, tmp_path) -> Path:
    path = tmp_path / "p.json"
    res = run("convert", src, "--plan", "--strategy", "even", "--full-ratio", "0.5", "--plan-out", path, "-q")
    assert res.exit_code == 0, res.output
    return path


@pytest.mark.parametrize("flags", [["--strategy", "layers"], ["--full-ratio", "0.25"], ["--kv-budget", "0.5"],
                                   ["--linear-kind", "gdn"], ["--keep-full", "0.0"], ["--objective", "kl"]])
def test_plan_file_with_a_planning_option_is_an_error(src, plan_file, tmp_path, flags) -> None:
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", plan_file, *flags, "-q")
    assert res.exit_code == 2 and "would be ignored" in res.output and flags[0] in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_the_card_counts_the_plan_not_its_budget_record(src, plan_file, tmp_path) -> None:
    doc = json.loads(plan_file.read_text())
    for layer in doc["layers"]:  # every head full, the budget record still saying 50%
        layer["heads"] = [{"kind": "full"} for _ in layer["heads"]]
    plan_file.write_text(json.dumps(doc))
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", plan_file, "-q")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "4 of 4 KV groups kept full" in card and "full ratio 0.5" not in card and "edited after planning" in card
    budget = json.loads((tmp_path / "out" / "config.json").read_text())["hydra"]["plan"]["budget"]
    assert budget["full_units"] == budget["total_units"] == 4 and budget["kv_fraction_used"] == 1.0
    assert "strategy" not in budget and budget["source"] == "plan_file"


def test_a_plan_file_that_still_fits_keeps_its_record(src, plan_file, tmp_path) -> None:
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", plan_file, "-q")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Strategy even (from the plan file), full ratio 0.5: 2 of 4 KV groups kept full." in card


def test_a_plan_made_for_another_model_type_needs_force(src, plan_file, tmp_path) -> None:
    doc = json.loads(plan_file.read_text())
    doc["model"]["model_type"] = "qwen2"
    plan_file.write_text(json.dumps(doc))
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", plan_file, "-q")
    assert res.exit_code == 2 and "'qwen2'" in res.output and "'llama'" in res.output, res.output
    assert not (tmp_path / "out").exists()
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", plan_file, "--force", "-q")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("budget, where", [
    ({"strategy": "<script>alert(1)</script>"}, "plan.budget.strategy"),
    ({"full_ratio": "0.25"}, "plan.budget.full_ratio"),
    ({"full_units": -1}, "plan.budget.full_units"),
    ({"full_decided_by": {"joint": ["[x](javascript:alert(1))"]}}, "plan.budget.full_decided_by.joint[0]"),
    ({"objective_fell_back_to_kl": "a\n## Fake section"}, "plan.budget.objective_fell_back_to_kl"),
    ({"stability": {"agree": 2}}, "plan.budget.stability.agree"),
    ({"surprise": 1}, "plan.budget.surprise"),
    ({"calibration": {"source": ["not", "text"]}}, "plan.budget.calibration.source"),
])
def test_a_bad_budget_record_fails_before_the_work(src, plan_file, tmp_path, budget, where) -> None:
    doc = json.loads(plan_file.read_text())
    doc["budget"] = budget
    plan_file.write_text(json.dumps(doc))
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", plan_file, "--json")
    assert res.exit_code == 2, res.output
    assert where in json.loads(res.stdout)["error"]
    assert not (tmp_path / "out").exists()


# --- 7. weights edited after conversion ----------------------------------------------------------------

def test_load_and_verify_refuse_weights_edited_after_conversion(src, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    import hydracc
    from hydracc.errors import CheckpointError

    out = tmp_path / "out"
    res = run("convert", src, "-o", out, "--strategy", "even", "--full-ratio", "0.5", "-q")
    assert res.exit_code == 0, res.output
    digests = json.loads((out / "config.json").read_text())["hydra"]["tensor_sha256"]
    tensors = load_file(out / "model.safetensors")
    assert sorted(digests) == sorted(tensors)
    hydracc.load(out)  # as written: accepted
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += 1.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"changed: {name}"):
        hydracc.load(out)
    res = run("verify", src, out, "--samples", "2", "--seq-len", "16", "--json")
    assert res.exit_code == 2 and "not the ones hydracc wrote" in json.loads(res.stdout)["error"], res.output
    import numpy as np

    ids = tmp_path / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 64, size=(4, 16)))
    long_ids = tmp_path / "long.npy"
    np.save(long_ids, np.random.default_rng(0).integers(0, 64, size=(2, 160)))
    res = run("verify", src, out, "--samples", "2", "--seq-len", "16", "--json", "--no-check-hashes", "--calib", ids,
              "--max-ppl-increase", "1000", "--min-recall-ratio", "0", "--min-agreement", "0")
    assert res.exit_code == 0, res.output
    for extra, code in (([], 2), (["--no-check-hashes"], 0)):  # eval (and generate, export-onnx) the same way
        res = run("eval", out, "--task", "ppl", "--calib", long_ids, "--json", *extra)
        assert res.exit_code == code, res.output
    model = hydracc.load(out, check_hashes=False)  # the escape: use them as they are
    assert torch.equal(model.state_dict()[name], tensors[name])
    del tensors["model.norm.weight"]  # a tensor gone is named too
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing: model.norm.weight"):
        from hydracc.runtime.loader import check_weight_digests

        check_weight_digests(out, json.loads((out / "config.json").read_text()))


# --- 14. names and numbers that cannot be used --------------------------------------------------------

@pytest.mark.parametrize("base", ["a\x7fb", "bad\nname", "x" * 300])
def test_base_model_that_cannot_be_a_hub_id_is_refused_before_the_work(src, tmp_path, base) -> None:
    res = run("convert", src, "-o", tmp_path / "out", "--strategy", "even", "--base-model", base, "-q")
    assert res.exit_code == 2 and "--base-model" in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_base_model_with_odd_but_printable_text_keeps_the_card_valid(src, tmp_path) -> None:
    import yaml

    base = 'org/"model" <b>#1</b> [x](javascript:y)'
    res = run("convert", src, "-o", tmp_path / "out", "--strategy", "even", "--base-model", base, "-q")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == [base]
    body = card.split("---\n", 2)[2]
    assert "<b>" not in body and "](javascript" not in body


@pytest.mark.parametrize("args, words", [
    (["--prompt", "caf\udcff"], "not UTF-8"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["--prompt", "x", "--temperature", "inf"], "--temperature"),
])
def test_generate_refuses_input_it_cannot_use(tmp_path, args, words) -> None:
    res = CliRunner().invoke(main, ["generate", str(tmp_path / "nowhere"), *args])
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output


def test_a_loaded_model_saved_again_carries_no_stale_digests(src, tmp_path) -> None:
    """Cast to bf16 (or fine-tuned) and saved: the copy makes no claim to be what hydracc wrote, and loads."""
    import torch

    import hydracc

    res = run("convert", src, "-o", tmp_path / "out", "--strategy", "even", "-q")
    assert res.exit_code == 0, res.output
    hydracc.load(tmp_path / "out", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert "tensor_sha256" not in json.loads((tmp_path / "bf16" / "config.json").read_text())["hydra"]
    assert next(hydracc.load(tmp_path / "bf16").parameters()).dtype == torch.bfloat16


def test_resume_takes_over_an_unmarked_state_of_an_earlier_hydracc_and_another_hosts_with_resume(tmp_path) -> None:
    import socket

    import torch

    from hydracc.errors import OutputError

    MARKER, TrainingState, read_owner = _state()
    folder = state_dir_for(tmp_path / "out")
    st = TrainingState(folder, "fp")
    st.save({"a": torch.ones(2)}, None, [], {"stage": 1})
    (folder / MARKER).unlink()  # as an earlier hydracc left it: the state file alone
    TrainingState(folder, "fp").claim(resume=True)
    assert read_owner(folder)["pid"] == os.getpid()
    (folder / MARKER).write_text(json.dumps({"format": "hydracc-distill-state", "pid": 1, "host": socket.gethostname()
                                             + "-elsewhere", "started": 0}))
    with pytest.raises(OutputError, match="rerun with --resume"):
        TrainingState(folder, "fp").claim()  # another machine's run may be alive: not without being asked
    TrainingState(folder, "fp").claim(resume=True)  # asked: taken over
    assert read_owner(folder)["host"] == socket.gethostname()
    (folder / "notes.txt").write_text("mine")  # a folder holding anything else is still refused when unmarked
    (folder / MARKER).unlink()
    with pytest.raises(OutputError, match="not hydracc's"):
        TrainingState(folder, "fp").claim(resume=True)


def test_plan_out_inside_the_output_or_a_symlink_loop_is_refused(src, tmp_path) -> None:
    out = tmp_path / "out"
    assert run("convert", src, "-o", out, "--strategy", "even", "-q").exit_code == 0
    res = run("convert", src, "-o", out, "--force", "--strategy", "even", "--plan-out", out / "plan.json", "-q")
    assert res.exit_code == 2 and "inside the output folder" in res.output, res.output
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    res = run("convert", src, "--plan", "--strategy", "even", "--plan-out", loop / "p.json", "-q")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output


def test_a_single_file_inputs_tokenizer_and_shards_are_protected(src, tmp_path) -> None:
    (src / "merges.txt").write_text("theirs")
    for name in ("merges.txt", "model-00002-of-00002.safetensors"):
        res = run("convert", src / "model.safetensors", "--plan", "--strategy", "even", "--plan-out", src / name,
                  "--force", "-q")
        assert res.exit_code == 2 and "inside the input" in res.output, (name, res.output)
    assert (src / "merges.txt").read_text() == "theirs"


def test_plan_file_keeps_a_keep_full_list_written_with_commas(src, tmp_path) -> None:
    res = run("convert", src, "--plan", "--strategy", "even", "--full-ratio", "0.5", "--keep-full", "0.0, 1.2", "--plan-out", tmp_path / "p.json",
              "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p.json").read_text())["budget"]["keep_full"] == ["0.0", "1.2"]
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", tmp_path / "p.json", "-q")
    assert res.exit_code == 0, res.output


def test_a_plan_whose_full_units_moved_loses_its_record(src, plan_file, tmp_path) -> None:
    """Same count, other units: the record's names no longer describe the plan, so the card does not repeat them."""
    doc = json.loads(plan_file.read_text())
    kinds = [[h["kind"] for h in layer["heads"]] for layer in doc["layers"]]
    doc["budget"]["full_decided_by"] = {"kl": [f"{layer['layer']}.{h}" for layer in doc["layers"]
                                               for h, head in enumerate(layer["heads"]) if head["kind"] == "full"][::2]}
    for layer, ks in zip(doc["layers"], kinds):  # swap the two KV groups of every layer
        layer["heads"] = [{"kind": k} for k in ks[2:] + ks[:2]]
    plan_file.write_text(json.dumps(doc))
    res = run("convert", src, "-o", tmp_path / "out", "--plan-file", plan_file, "-q")
    assert res.exit_code == 0, res.output
    card = (tmp_path / "out" / "README.md").read_text()
    assert "edited after planning" in card and "decided by" not in card


def test_update_card_with_a_broken_marker_fails_before_the_models_run(tmp_path) -> None:
    from hydracc.emit.model_card import VERIFY_BEGIN
    from hydracc.evaluation.verify import VerifyError, card_path

    (tmp_path / "README.md").write_text(f'---\ntags:\n- "hydracc"\n---\n# m\n\n{VERIFY_BEGIN}\n## How to load\n')
    with pytest.raises(VerifyError, match="without"):
        card_path(tmp_path)
