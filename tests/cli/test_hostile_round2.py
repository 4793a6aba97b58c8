"""Hostile inputs, round 2 (issue 30): rich markup in user text, double signals, over-long names, unbounded
calibration, special files as --calib, encoder models, a wrong ``progress`` in the API. Each is one clear message and
exit 2 (or 143/130), never a traceback or exit 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import ROOT

from hydracc.cli import main
from hydracc.cli.common import Reporter, run_command

EXAMPLE = ROOT / "examples" / "tiny-llama"
LONG = "a" * 240  # fits a 255-byte name alone, not with hydracc's ".NAME.hydracc-tmp-xxxxxxxx" beside it
TOO_LONG = "b" * 300


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _temp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".hydracc-tmp-" in p.name or ".hydracc-old-" in p.name]


# --- 9: user text and messages are never rich markup ----------------------------------------------------------

def test_user_text_is_printed_as_is_not_as_markup(tmp_path) -> None:
    res = run("convert", "nope[/]x", "--plan")
    assert res.exit_code == 2, res.output
    assert "nope[/]x does not exist" in res.output and "Traceback" not in res.output
    res = run("convert", "nope[/]x", "--plan", "--json")
    assert res.exit_code == 2, res.output
    assert json.loads(res.stdout)["exit_code"] == 2 and "nope[/]x" in json.loads(res.stdout)["error"]
    res = run("convert", "model[v2]", "--plan")
    assert res.exit_code == 2 and "model[v2] does not exist" in res.output, res.output
    # the success path too: a path with brackets in what convert prints
    plan = tmp_path / "plan[v2].json"
    res = run("convert", EXAMPLE, "--plan", "--strategy", "even", "--plan-out", plan)
    assert res.exit_code == 0, res.output
    assert "plan[v2].json" in res.output and plan.is_file()


def test_hydraccs_own_brackets_survive_in_a_message(tmp_path) -> None:
    bad = tmp_path / "ids.npy"
    np.save(bad, np.zeros((2, 2, 40), dtype=np.int64))
    res = run("convert", EXAMPLE, "--plan", "--calib", bad, "--calib-samples", "2", "--seq-len", "16")
    assert res.exit_code == 2, res.output
    assert "expected [samples, seq_len]" in res.output


# --- 10: a second signal does not undo the first one's clean-up -------------------------------------------------

@pytest.fixture
def signal_command():
    """Register a test command on the group (``hydracc signal-test``) and put the signal handlers back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    added: list[str] = []

    def add(work, after=None) -> None:
        @click.command("signal-test")
        def command() -> None:
            run_command(Reporter(False, True), work)
            if after is not None:
                after()

        main.add_command(command)
        added.append("signal-test")

    yield add
    for name in added:
        main.commands.pop(name, None)
    for s, handler in saved.items():
        signal.signal(s, handler)


def _kill_self(*signums: int) -> None:
    for s in signums:
        os.kill(os.getpid(), s)


def test_a_second_signal_waits_for_the_first_ones_clean_up(signal_command) -> None:
    cleaned: list[str] = []

    def work() -> None:
        try:
            _kill_self(signal.SIGTERM)
            time.sleep(5)  # the first signal lands here
            cleaned.append("not interrupted?")
        finally:
            _kill_self(signal.SIGTERM, signal.SIGINT)  # `timeout` again, then Ctrl-C, while cleaning up
            time.sleep(0.05)
            cleaned.append("cleaned")

    signal_command(work)
    res = run("signal-test")
    assert res.exit_code == 143, res.output
    assert cleaned == ["cleaned"]
    assert "Aborted!" not in res.output and "terminated" in res.output


def test_a_signal_while_the_error_is_reported_keeps_the_exit_code(signal_command, monkeypatch) -> None:
    original = Reporter.fail

    def fail(self: Reporter, message: str, code: int) -> None:
        _kill_self(signal.SIGINT)  # a twice-pressed Ctrl-C lands while the first one's message is printed
        time.sleep(0.05)
        original(self, message, code)

    monkeypatch.setattr(Reporter, "fail", fail)

    def work() -> None:
        _kill_self(signal.SIGINT)
        time.sleep(5)

    signal_command(work)
    res = run("signal-test")
    assert res.exit_code == 130, res.output
    assert "Aborted!" not in res.output and "interrupted" in res.output


def test_a_signal_outside_the_guard_is_not_clicks_abort(signal_command) -> None:
    signal_command(lambda: None, after=lambda: (_kill_self(signal.SIGTERM), time.sleep(5)))
    res = run("signal-test")
    assert res.exit_code == 143, res.output
    assert "Aborted!" not in res.output


@pytest.mark.slow
def test_sigterm_then_ctrl_c_during_the_clean_up(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hydracc", "convert", str(EXAMPLE), "-o", str(out), "--distill",
                             "--steps", "100000", "--distill-samples", "8", "--calib-samples", "8", "--seq-len", "64",
                             "--save-every", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out.hydracc-distill" / "state.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)  # the first one's clean-up (or the interpreter's shutdown after it) is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err and "Aborted!" not in err
    assert not out.exists() and not _temp_leftovers(tmp_path)


# --- 11: over-long names are refused before any work ------------------------------------------------------------

def test_an_output_name_too_long_for_the_temporary_folder_is_refused_first(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    res = run("convert", EXAMPLE, "-o", LONG)  # the analysis would run first
    assert res.exit_code == 2, res.output
    assert "too long" in res.output and "hydracc adds" in res.output and "at most 233" in res.output
    assert time.perf_counter() - start < 10
    assert not _temp_leftovers(tmp_path) and not Path(LONG).exists()
    res = run("convert", EXAMPLE, "-o", TOO_LONG, "--json")
    assert res.exit_code == 2 and "too long" in json.loads(res.stdout)["error"], res.output


@pytest.mark.parametrize("args", [
    ["convert", TOO_LONG, "--plan"],
    ["convert", EXAMPLE / TOO_LONG, "--plan"],
    ["convert", EXAMPLE, "--plan", "--plan-out", "p" * 250 + ".json"],
    ["convert", EXAMPLE, "--plan", "--calib", TOO_LONG],
    ["eval", TOO_LONG],
    ["analyze", TOO_LONG],
    ["export-onnx", EXAMPLE, "-o", LONG],
    ["export-onnx", TOO_LONG],
], ids=["input", "input-inside", "plan-out", "calib", "eval", "analyze", "export-folder", "export-input"])
def test_over_long_names_are_bad_input(tmp_path, monkeypatch, args) -> None:
    monkeypatch.chdir(tmp_path)
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert "too long" in res.output and "File name too long" not in res.output and "internal error" not in res.output
    assert not list(tmp_path.iterdir())


def test_name_length_helper() -> None:
    from hydracc.errors import OutputError
    from hydracc.paths import TEMP_NAME_EXTRA, check_name_length

    assert TEMP_NAME_EXTRA == len(".") + len(".hydracc-tmp-1a2b3c4d")
    check_name_length(Path("/tmp") / ("x" * (255 - TEMP_NAME_EXTRA)), "output", extra=TEMP_NAME_EXTRA)
    with pytest.raises(OutputError, match="too long"):
        check_name_length(Path("/tmp") / ("x" * (256 - TEMP_NAME_EXTRA)), "output", extra=TEMP_NAME_EXTRA)
    with pytest.raises(OutputError, match="too long"):
        check_name_length(Path("/tmp") / ("y" * 20) / ("x" * 256) / "out", "output")  # a folder on the way
    with pytest.raises(OutputError, match="4096"):
        check_name_length(Path("/tmp").joinpath(*["z" * 200] * 21), "output")


# --- 12: calibration beyond what the analysis can hold ----------------------------------------------------------

def test_a_billion_calibration_rows_are_refused_before_the_work() -> None:
    start = time.perf_counter()
    res = run("convert", EXAMPLE, "--plan", "--calib-samples", "1000000000")
    assert res.exit_code == 2, res.output
    assert "more than the analysis can hold" in res.output and "hidden state" in res.output
    assert "at most" in res.output and "of memory" in res.output
    assert time.perf_counter() - start < 15


def test_the_calibration_bound_is_the_memory_the_hidden_states_need() -> None:
    from hydracc.analysis.calibration import CalibrationError, check_calibration_size

    # 4 layers + the head, 128 values of 4 bytes: 2560 bytes per token
    check_calibration_size(16, 256, hidden=128, layers=4, element_bytes=4, memory=16 * 256 * 2560)
    with pytest.raises(CalibrationError, match="at most 4096 calibration tokens"):
        check_calibration_size(17, 256, hidden=128, layers=4, element_bytes=4, memory=16 * 256 * 2560)


# --- 15: --calib that is not a regular file ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["device", "folder", "fifo"])
def test_calib_that_is_not_a_regular_file_says_what_it_is(tmp_path, kind) -> None:
    from hydracc.analysis.calibration import CalibrationError, load_calibration

    if kind == "device":
        path, word = Path("/dev/zero"), "character device"
    elif kind == "folder":
        path, word = tmp_path, "folder"
    else:
        path, word = tmp_path / "pipe", "named pipe"
        os.mkfifo(path)
    res = run("convert", EXAMPLE, "--plan", "--calib", path)
    assert res.exit_code == 2, res.output
    assert word in res.output and "regular file" in res.output and "does not exist" not in res.output
    with pytest.raises(CalibrationError, match=word):  # eval's, verify's and analyze's --calib read it here
        load_calibration(path, vocab_size=256, samples=2, seq_len=16)


# --- 16: encoder models --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    out = tmp_path_factory.mktemp("bert")
    BertModel(cfg).save_pretrained(out)
    return out


def test_an_encoder_is_told_encoders_are_not_supported(bert) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}  # transformers' default: warnings
    proc = subprocess.run([sys.executable, "-m", "hydracc", "convert", str(bert), "--plan", "--seq-len", "32"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr  # hydracc's error first, no lines from transformers
    assert "encoder models are not supported" in proc.stderr and "missing tensor" not in proc.stderr


def test_transformers_notes_stay_off_stderr_while_hydracc_builds_models() -> None:
    import logging

    from hydracc.frontend.model import quiet_transformers

    seen: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    root, child = logging.getLogger("transformers"), logging.getLogger("transformers.models.bert.modeling_bert")
    level = root.level
    root.addHandler(collect)
    root.setLevel(logging.WARNING)  # transformers' default (the tests run it at error)
    try:
        with quiet_transformers():
            child.warning("If you want to use `BertLMHeadModel` as a standalone, add `is_decoder=True.`")
            child.error("an error still shows")
        child.warning("after hydracc's build: shown again")
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    assert seen == ["an error still shows", "after hydracc's build: shown again"]


def test_encoders_are_refused_by_every_command(bert, tmp_path) -> None:
    for args in (["analyze", bert, "--seq-len", "32"], ["eval", bert], ["verify", bert, bert]):
        res = run(*args)
        assert res.exit_code == 2 and "encoder models are not supported" in res.output, (args, res.output)


# --- 17: the API's progress argument ---------------------------------------------------------------------------

def test_a_wrong_progress_is_an_option_error_before_any_work(tmp_path) -> None:
    from hydracc.convert import ConvertOptions, ProgressHooks, convert, run_conversion
    from hydracc.pipeline.options import OptionError

    class Partial:  # no wrote()
        def begin(self, stage, total=None): ...
        def end(self, stage): ...
        def analyzed(self, done, total): ...
        def distilled(self, stage, step, steps, loss): ...
        def converted(self, result): ...

    options = ConvertOptions(EXAMPLE, dry_run=True, strategy="even")
    start = time.perf_counter()
    with pytest.raises(OptionError, match="progress must be a ProgressHooks"):
        convert(EXAMPLE, tmp_path / "out", progress=42)
    with pytest.raises(OptionError, match="no wrote method"):
        run_conversion(options, progress=Partial())
    assert time.perf_counter() - start < 1.0  # before any work
    assert not (tmp_path / "out").exists()
    result = convert(EXAMPLE, None, dry_run=True, strategy="even", progress=ProgressHooks())
    assert result.plan is not None
