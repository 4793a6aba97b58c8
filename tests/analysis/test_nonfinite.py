"""Non-finite values: a RoPE config that makes them is refused before the work, and a NaN or infinity met
while analyzing or distilling is an error naming the layer, never a plan or parameters built on NaN."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hydracc import convert as pipeline
from hydracc.analysis.layerwise import NonFiniteError
from hydracc.cli import main
from hydracc.distill.e2e import Teacher, held_out_kl
from hydracc.distill.records import runner_for
from hydracc.distill.train import DistillError, DistillSettings, distill, initial_values, param_name
from hydracc.errors import EXIT_BAD_INPUT, CheckpointError
from hydracc.frontend.model import load_config
from hydracc.pipeline import ConvertOptions, run_conversion
from hydracc.planning.budget import Budget

SEQ = 16


def _variant(src, tmp_path, name: str, config=None, weights=None):
    """A copy of checkpoint ``src`` with ``config(dict)`` and ``weights(dict)`` applied in place."""
    out = tmp_path / name
    shutil.copytree(src, out)
    if config is not None:
        cfg = json.loads((out / "config.json").read_text())
        config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        tensors = load_file(out / "model.safetensors")
        weights(tensors)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _theta_zero_legacy(cfg):  # transformers 4.x spelling: a top-level rope_theta
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 0


def _theta_zero(cfg):
    cfg["rope_parameters"]["rope_theta"] = 0


def _scaling(factor):
    def patch(cfg):
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}

    return patch


@pytest.mark.parametrize("patch,field", [
    (_theta_zero_legacy, "rope_theta is 0"),
    (_theta_zero, "rope_parameters.rope_theta is 0"),
    (_scaling(0), "rope_scaling.factor is 0"),
    (_scaling(-2), "rope_scaling.factor is -2"),
], ids=["theta0-legacy", "theta0", "factor0", "factor-2"])
def test_an_invalid_rope_config_exits_2_before_the_analysis(tiny_checkpoint, tmp_path, patch, field) -> None:
    src = _variant(tiny_checkpoint("llama-gqa"), tmp_path, "bad-rope", config=patch)
    plan = tmp_path / "plan.json"
    res = CliRunner().invoke(main, ["convert", str(src), "--plan", "--plan-out", str(plan), "--calib-samples", "2",
                                    "--seq-len", str(SEQ)])
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert field in res.output and "hint:" in res.output and "config.json" in res.output
    assert not plan.exists()


def test_rope_values_transformers_warns_about_are_said_whatever_its_verbosity(tiny_checkpoint) -> None:
    """Out of transformers' range but computable (it only logs): a hydracc warning before the work, not a refusal;
    a missing key is an error."""
    cfg = json.loads((tiny_checkpoint("llama-gqa") / "config.json").read_text())
    good = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256}
    assert load_config({**cfg, "rope_parameters": dict(good)}).rope_parameters["factor"] == 8.0
    with pytest.warns(UserWarning, match="high_freq_factor field must be greater than low_freq_factor"):
        load_config({**cfg, "rope_parameters": {**good, "low_freq_factor": 4.0, "high_freq_factor": 1.0}})
    with pytest.warns(UserWarning, match="factor field must be a float or int >= 1, got 0.5"):
        load_config({**cfg, "rope_scaling": {"rope_type": "linear", "factor": 0.5}})
    with pytest.raises(CheckpointError, match="Missing required"):
        load_config({**cfg, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0}})
    for value in (math.inf, math.nan, "10000", True):
        with pytest.raises(CheckpointError, match="rope_parameters.rope_theta is .*finite number"):
            load_config({**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": value}})
    with pytest.raises(CheckpointError, match=r"partial_rotary_factor is 1.5"):
        load_config({**cfg, "partial_rotary_factor": 1.5})
    # advice stays a warning: keys transformers does not know (some families store their own), and yarn's
    # factor against max_position_embeddings / original_max_position_embeddings (Qwen3's documented setting)
    load_config({**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mine": 1}})
    yarn = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    assert load_config({**cfg, "max_position_embeddings": 40960, "rope_parameters": yarn}).rope_parameters["factor"] == 4.0


def _overflow_layer1_attention(tensors):
    """Finite weights (the checkpoint's NaN/inf check passes) whose q.k overflows float32 at layer 1."""
    for name in ("q_proj", "k_proj"):
        tensors[f"model.layers.1.self_attn.{name}.weight"] *= 1e20


def _nan_layer1_mlp(tensors):
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")


def test_attention_that_overflows_at_one_layer_stops_the_analysis_naming_it(tiny_checkpoint, tmp_path) -> None:
    src = _variant(tiny_checkpoint("llama-gqa"), tmp_path, "overflow", weights=_overflow_layer1_attention)
    options = ConvertOptions(src, dry_run=True, calib_samples=2, seq_len=SEQ, plan_out=tmp_path / "plan.json")
    with pytest.raises(NonFiniteError, match="layer 1, attention heads 0, 1, 2, 3") as err:
        run_conversion(options)
    assert err.value.layer == 1 and err.value.exit_code == EXIT_BAD_INPUT and "layer 1's attention weights" in str(err.value)
    assert "While executing" not in str(err.value)  # torch.fx's note on the graph node stays out of the message
    assert not (tmp_path / "plan.json").exists()


def test_a_nan_weight_mid_model_stops_the_analysis_naming_its_layer(tiny_checkpoint, tmp_path) -> None:
    src = _variant(tiny_checkpoint("llama-gqa"), tmp_path, "nan", weights=_nan_layer1_mlp)
    res = CliRunner().invoke(main, ["convert", str(src), "--plan", "--allow-nonfinite", "--plan-out",
                                    str(tmp_path / "plan.json"), "--calib-samples", "2", "--seq-len", str(SEQ)])
    assert res.exit_code == EXIT_BAD_INPUT, res.output
    assert "outputs are NaN at layer 1" in res.output and "check layer 1's weights" in res.output
    assert not (tmp_path / "plan.json").exists()


def _setup(src, samples: int = 8):
    insp = pipeline.inspect_checkpoint(src, capture_shape=pipeline.calibration_shape(samples, SEQ))
    # layer 1 keeps every head full: only layer 0 learns, and only the end-to-end judge runs past it
    plan = pipeline.make_plan(insp, budget=Budget(full_ratio=0.5), strategy="even", linear_kind="hedgehog", fusion=True,
                              keep_full=("1.0", "1.2"))
    assert [lp.layer for lp in plan.layers if plan.layer_has_params(lp)] == [0]
    return insp, plan, pipeline.calibration_for(insp, samples=samples, seq_len=SEQ)


def test_a_nan_in_the_original_model_stops_distillation_naming_the_layer(tiny_checkpoint) -> None:
    insp, plan, calibration = _setup(tiny_checkpoint("llama-gqa"))
    weights = {k: v.clone() for k, v in insp.load_weights().items()}
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    with pytest.raises(DistillError, match="original model's outputs are NaN at layer 1") as err:
        distill(insp.captured, weights, plan, calibration, DistillSettings(steps=2, holdout=0.25))
    assert "learning rate" not in str(err.value)


def test_the_held_out_kl_of_non_finite_parameters_is_an_error_naming_the_layer(tiny_checkpoint) -> None:
    insp, plan, calibration = _setup(tiny_checkpoint("llama-gqa"))
    weights = insp.load_weights()
    values = initial_values(insp.captured, weights, plan, calibration)
    name = param_name(insp.captured.site(0), "hedgehog_weight")
    assert name in values
    values[name] = torch.full_like(values[name], float("nan"))
    runner = runner_for(insp.captured, weights, torch.device("cpu"))
    teacher = Teacher(runner, calibration)
    with pytest.raises(NonFiniteError, match="converted model .* are NaN at layer 0") as err:
        held_out_kl(runner, plan, values, param_name, teacher, calibration, [0, 1])
    assert err.value.layer == 0 and "learning rate" in str(err.value)


def test_a_scored_kind_that_overflows_on_finite_inputs_is_an_error_naming_the_unit(tiny_checkpoint, monkeypatch) -> None:
    from hydracc.analysis import scores

    calls = []
    original = scores.run_kind

    def overflow_at_layer_1(*args, **kwargs):  # the sweep scores layer 0, then layer 1 (one batch)
        calls.append(1)
        out = original(*args, **kwargs)
        return out.fill_(float("inf")) if len(calls) == 2 else out

    monkeypatch.setattr(scores, "run_kind", overflow_at_layer_1)
    insp = pipeline.inspect_checkpoint(tiny_checkpoint("llama-gqa"), capture_shape=pipeline.calibration_shape(2, SEQ))
    calibration = pipeline.calibration_for(insp, samples=2, seq_len=SEQ)
    with pytest.raises(NonFiniteError, match=r"non-finite linear_error \(.*\) at layer 1, head 0 \(unit 1.0\)") as err:
        pipeline.analyze_heads(insp, calibration)
    assert err.value.layer == 1 and "--linear-kind" in str(err.value)
