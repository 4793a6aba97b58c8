"""``run_conversion``: the one conversion, its dry run and its progress hooks."""

from __future__ import annotations

import json

from hydracc.pipeline import ConvertOptions, ProgressHooks, convert, run_conversion


class Recorder(ProgressHooks):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.analyzed_calls = 0
        self.bytes = 0
        self.results: list = []

    def begin(self, stage, total=None):
        self.events.append(f"begin:{stage}")

    def end(self, stage):
        self.events.append(f"end:{stage}")

    def analyzed(self, done, total):
        self.analyzed_calls += 1

    def wrote(self, name, nbytes):
        self.bytes += nbytes

    def converted(self, result):
        self.results.append(result)


def test_dry_run_plans_writes_only_the_plan_and_reports_progress(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    before = sorted(p.name for p in src.iterdir())
    hooks = Recorder()
    options = ConvertOptions(src, dry_run=True, calib_samples=2, seq_len=16, plan_out=tmp_path / "plan.json")
    result = run_conversion(options, progress=hooks)
    assert hooks.events == ["begin:analyze", "end:analyze"] and hooks.analyzed_calls > 0
    assert hooks.results == [result]
    assert result.output is None and result.rewrite is None and result.files == [] and result.analysis is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    assert sorted(p.name for p in src.iterdir()) == before
    report = result.to_json()
    assert report["mode"] == "plan" and report["plan"] == json.loads((tmp_path / "plan.json").read_text())


def test_convert_is_run_conversion_with_keywords(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    hooks = Recorder()
    result = convert(src, tmp_path / "out", full_ratio=0.5, strategy="even", progress=hooks)
    assert hooks.events == ["begin:write", "end:write"] and hooks.bytes > 0
    assert result.output == tmp_path / "out" and (tmp_path / "out" / "config.json").exists()
    report = result.to_json()
    assert report["mode"] == "convert" and report["passes"] == ["fold-gqa", "hybridize", "permute-heads"]
    assert isinstance(report["pass_counts"], dict)
    run_conversion(ConvertOptions(src, output=tmp_path / "again", full_ratio=0.5, strategy="even"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_ctrl_c_while_learning_exits_130_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    import pytest
    from click.testing import CliRunner

    from hydracc.cli import main
    from hydracc.pipeline import Interrupted, stages

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "learn_params", interrupted)
    args = ["convert", str(tiny_checkpoint("llama-gqa")), "-o", str(tmp_path / "out"), "--strategy", "even",
            "--linear-kind", "hedgehog", "--seq-len", "16", "--calib-samples", "2"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 130 and f"interrupted; nothing was written to {tmp_path / 'out'}" in res.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(Interrupted):  # a KeyboardInterrupt for Python callers
        convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", strategy="even", linear_kind="hedgehog", seq_len=16,
                calib_samples=2)


def test_unit_names_and_layer_limits_fail_before_the_analysis(tiny_checkpoint, tmp_path) -> None:
    """What the config decides (layers, heads) is checked right after it is read, not after minutes of analysis."""
    import pytest

    from hydracc.errors import PlanError

    src = tiny_checkpoint("llama-gqa")
    for kwargs, message in (({"keep_full": ["99.0"]}, "--keep-full"), ({"force_linear": ["0.99"]}, "--force-linear"),
                            ({"min_full_per_layer": 10}, "min-full-per-layer")):
        hooks = Recorder()
        with pytest.raises(PlanError, match=message):
            run_conversion(ConvertOptions(src, dry_run=True, calib_samples=2, seq_len=16, **kwargs), progress=hooks)
        assert hooks.events == [] and hooks.analyzed_calls == 0, kwargs
