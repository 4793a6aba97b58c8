"""``ConvertOptions``: declared once, mapped one-to-one onto ``hydracc convert``'s flags, checked before any work."""

from __future__ import annotations

import dataclasses
import warnings

import click
import pytest
from click.testing import CliRunner

from hydracc.cli import main
from hydracc.cli.convert import convert_command
from hydracc.errors import HydraError, OutputError
from hydracc.pipeline import ConvertOptions, OptionError, convert, linear_kind_choices

FIELDS = {f.name: f for f in dataclasses.fields(ConvertOptions)}
CLI_ONLY = {"as_json", "quiet"}  # presentation, not conversion options


def test_every_field_has_exactly_one_cli_parameter_and_back() -> None:
    params = {p.name: p for p in convert_command.params}
    assert set(params) - CLI_ONLY == set(FIELDS)
    for name, f in FIELDS.items():
        p = params[name]
        if f.metadata["argument"]:
            assert isinstance(p, click.Argument)
            continue
        assert isinstance(p, click.Option)
        assert set(f.metadata["flags"]) <= set(p.opts), name
        if f.metadata["secondary"]:
            assert p.secondary_opts == [f.metadata["secondary"]]
        if f.metadata["type"] is not bool and not f.metadata["multiple"]:
            assert p.default == f.default, name


def test_flag_spellings_are_unchanged() -> None:
    flags = {o for p in convert_command.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    assert flags == {
        "--plan", "-o", "--output", "--plan-file", "--plan-out", "--plan-png", "--strategy", "--full-ratio", "--kv-budget",
        "--score", "--min-full-per-layer", "--max-full-per-layer", "--keep-full", "--force-linear", "--seed",
        "--linear-kind", "--sink", "--window", "--fusion", "--no-fusion", "--calib", "--calib-samples", "--seq-len",
        "--distill", "--steps", "--e2e-steps", "--lr", "--e2e-lr", "--distill-samples", "--distill-batch", "--save-every",
        "--resume", "--device", "--pass", "--plugin", "--permute", "--no-permute", "--force", "--max-shard-size", "--onnx",
        "--atol", "--json", "-q", "--quiet",
        "--base-model", "--allow-nonfinite",  # added with the release gate (model card, non-finite weights)
        "--sensitivity", "--exact-k",  # added with the linear-cost analysis
        "--objective", "--distill-holdout",  # added with recall-first selection and held-out distillation
    }


def test_help_lists_every_option_with_its_help_and_default() -> None:
    res = CliRunner().invoke(main, ["convert", "--help"], terminal_width=100)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for f in FIELDS.values():
        if f.metadata["argument"]:
            continue
        for flag in f.metadata["flags"]:
            assert flag in text
        assert " ".join(f.metadata["help"].split()[:4]) in text
    assert "[default: heads]" in text and "[default: 5GB]" in text and "[default: 256;" in text


def test_kind_choices_come_from_the_kind_table() -> None:
    from hydracc.kernels.kinds import KIND_NAMES

    assert linear_kind_choices() == tuple(k for k in KIND_NAMES if k != "full")
    linear_kind = next(p for p in convert_command.params if p.name == "linear_kind")
    assert tuple(linear_kind.type.choices) == linear_kind_choices()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_budget": "0.25"}, "kv_budget must be a number, got '0.25' (str)"),
        ({"kv_budget": 2}, "kv_budget must be a number from 0 to 1, got 2 (int)"),
        ({"calib_samples": 0}, "calib_samples must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be a number > 0"),
        ({"steps": 1.5}, "steps must be an integer"),
        ({"distill": "yes"}, "distill must be True or False"),
        ({"linear_kind": "full"}, "linear_kind must be one of 'elu', 'hedgehog', 'gdn', 'streaming', got 'full'"),
        ({"strategy": "best"}, "strategy must be one of"),
        ({"keep_full": [1.3]}, "keep_full: every item must be a string"),
        ({"user_passes": [3]}, "user_passes: every item must be a pass name or function"),
        ({"kv_budgett": 0.25}, "unknown conversion option 'kv_budgett' (did you mean 'kv_budget'?)"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"kv_budget": float("nan")}, "kv_budget must be a finite number, got nan"),
    ],
)
def test_bad_values_are_hydra_errors_before_any_work(tmp_path, kwargs, message) -> None:
    with pytest.raises(OptionError) as exc:
        convert(tmp_path / "no-such-model", tmp_path / "out", **kwargs)  # the path is never looked at
    assert message in str(exc.value)
    assert "--" not in str(exc.value).split("hint:")[0]
    assert exc.value.exit_code == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"full_ratio": 0.5, "kv_budget": 0.5}, "give one budget: full_ratio or kv_budget, not both"),
        ({"sink": 2, "linear_kind": "elu"}, "sink and window set streaming heads: add linear_kind='streaming'"),
        ({"resume": True}, "resume=True continues a distillation: add distill=True"),
        ({"distill": True, "fusion": False}, "distill=True trains the fusion scales: drop fusion=False"),
        ({"linear_kind": "hedgehog", "fusion": False}, "hedgehog heads always come with fusion"),
        ({"max_shard_size": "5 parsecs"}, "max_shard_size: cannot parse size"),
        ({"dry_run": True}, "dry_run=True is a dry run and writes no checkpoint"),
        ({"user_passes": ["no-such-pass"]}, "no pass named 'no-such-pass'"),
        ({"plan_out": "/no/such/folder/plan.json"}, "plan_out /no/such/folder/plan.json: the folder /no/such/folder does not exist"),
    ],
)
def test_conflicting_options_name_the_keywords(tmp_path, kwargs, message) -> None:
    with pytest.raises(HydraError, match=None) as exc:
        convert(tmp_path / "no-such-model", tmp_path / "out", **kwargs)
    assert message in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_first(tmp_path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists") as exc:
        convert(tmp_path / "no-such-model", tmp_path / "out")
    assert "force=True" in str(exc.value)


def test_options_are_frozen_and_normalised(tmp_path) -> None:
    o = ConvertOptions(str(tmp_path), keep_full="1.3", kv_budget=1, dry_run=True)
    assert o.path == tmp_path and o.keep_full == ("1.3",) and o.kv_budget == 1.0 and isinstance(o.kv_budget, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.seed = 3  # type: ignore[misc]
    assert o.replace(seed=3).seed == 3
    assert ConvertOptions(tmp_path, sink=2, linear_kind="streaming").kind_params == {"sink": 2}


def test_legacy_keywords_map_onto_fields() -> None:
    from hydracc.distill.train import DistillSettings
    from hydracc.pipeline.run import _legacy_kwargs

    got = _legacy_kwargs({"max_shard_bytes": 30_000, "kind_params": {"window": 8},
                          "distill_settings": DistillSettings(steps=3, e2e_steps=1, seed=1, batch=4)})
    assert got == {"max_shard_size": 30_000, "window": 8, "distill": True, "steps": 3, "e2e_steps": 1, "lr": 1e-2,
                   "e2e_lr": 1e-3, "distill_batch": 4, "save_every": 50, "device": None, "seed": 1}
    with pytest.raises(OptionError, match="differ"):
        _legacy_kwargs({"seed": 0, "distill_settings": DistillSettings(seed=1)})


def test_readme_imports_still_work() -> None:
    import hydracc.convert as old
    import hydracc.pipeline as new

    for name in ("convert", "inspect_checkpoint", "calibration_for", "analyze_heads", "make_plan", "learn_params",
                 "rewrite", "emit", "ConvertOptions", "run_conversion"):
        assert getattr(old, name) is getattr(new, name)
    with pytest.warns(DeprecationWarning, match="hydracc.convert moved: import Budget from hydracc.pipeline.stages"):
        budget = old.Budget
    from hydracc.planning.budget import Budget

    assert budget is Budget
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from hydracc.convert import convert as _  # noqa: F401  # the README's names warn not
