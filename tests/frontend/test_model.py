"""Building models from configs and matching checkpoint tensors to them the way transformers does."""

import json

import pytest
import torch
from helpers import load_original
from safetensors.torch import load_file, save_file

import hydracc
from hydracc.convert import convert
from hydracc.errors import CheckpointError, UnsupportedModelError
from hydracc.frontend.checkpoint import open_checkpoint
from hydracc.frontend.model import build_model, check_runtime_support, match_weights


def _rewrite_tensors(folder, fn) -> None:
    path = folder / "model.safetensors"
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


def test_gpt2_checkpoint_in_hub_layout(tiny_checkpoint, tmp_path) -> None:
    """GPT-2 checkpoints on the Hub name base-model weights (h.0...) and carry attn.bias masks."""
    src = tmp_path / "gpt2hub"
    src.mkdir()
    orig = tiny_checkpoint("gpt2-mha")
    (src / "config.json").write_text((orig / "config.json").read_text())
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(orig / "model.safetensors").items() if k != "lm_head.weight"}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 8, 8).tril()
    save_file(tensors, src / "model.safetensors")
    with open_checkpoint(src) as ck:
        mapping = match_weights(build_model(ck.config), ck)
    assert mapping["transformer.h.0.attn.c_attn.weight"] == "h.0.attn.c_attn.weight"
    assert "lm_head.weight" not in mapping  # tied to wte, loaded by transformers
    convert(src, tmp_path / "out", full_ratio=1.0, strategy="even")
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert torch.equal(hydracc.load(tmp_path / "out")(ids).logits, load_original(orig)(ids).logits)


def test_leftover_rope_buffer_is_dropped(tiny_checkpoint, tmp_path) -> None:
    import shutil

    src = tmp_path / "in"
    shutil.copytree(tiny_checkpoint("llama-gqa"), src)
    _rewrite_tensors(src, lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    result = convert(src, tmp_path / "out", full_ratio=0.5, strategy="even")
    assert result.inspection.dropped == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in load_file(tmp_path / "out" / "model.safetensors")


def test_shape_and_name_errors_say_which(tiny_checkpoint, tmp_path) -> None:
    import shutil

    src = tmp_path / "in"
    shutil.copytree(tiny_checkpoint("llama-gqa"), src)
    _rewrite_tensors(src, lambda t: {("model.layers.0.mlp.gate.weight" if k.endswith("0.mlp.gate_proj.weight") else k): v for k, v in t.items()})
    with open_checkpoint(src) as ck, pytest.raises(CheckpointError) as err:
        match_weights(build_model(ck.config), ck)
    text = str(err.value)
    assert "missing tensor model.layers.0.mlp.gate_proj.weight" in text
    assert "unexpected tensor model.layers.0.mlp.gate.weight" in text
    assert "do not follow transformers' layout" in text


def test_family_without_attention_interface_is_refused(tmp_path) -> None:
    from transformers import FalconConfig

    cfg = FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4).to_dict()
    with pytest.raises(UnsupportedModelError, match="custom attention function"):
        check_runtime_support(cfg, [])


def test_unknown_model_type_in_config() -> None:
    with pytest.raises(UnsupportedModelError, match="transformers knows"):
        build_model({"model_type": "definitely-not-a-model"})
    with pytest.raises(CheckpointError, match="model_type"):
        build_model(json.loads('{"hidden_size": 4}'))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_attention_heads", 3, "not a multiple of num_key_value_heads"),
        ("num_attention_heads", -4, "num_attention_heads is -4; it must be a positive integer"),
        ("num_attention_heads", True, "must be a positive integer"),
        ("hidden_size", "32", "hidden_size is '32'; it must be a positive integer"),
        ("num_hidden_layers", 0, "must be a positive integer"),
        ("rms_norm_eps", "tiny", "not a valid 'llama' config"),
        ("hidden_act", "nope", "cannot build a 'llama' model"),
    ],
)
def test_bad_config_values_are_bad_input(tiny_checkpoint, key, value, message) -> None:
    config = json.loads((tiny_checkpoint("llama-gqa") / "config.json").read_text())
    config[key] = value
    with pytest.raises(CheckpointError, match=message) as info:
        build_model(config)
    assert info.value.exit_code == 2


def test_architecture_checks_of_transformers_are_bad_input(tiny_checkpoint) -> None:
    config = json.loads((tiny_checkpoint("llama-gqa") / "config.json").read_text())
    config.update(num_attention_heads=3, num_key_value_heads=1)  # hidden 32 is not a multiple of 3 heads
    with pytest.raises(CheckpointError, match="not a valid 'llama' config"):
        build_model(config)


def test_a_converted_checkpoint_is_not_converted_or_analyzed_again(tiny_checkpoint, tmp_path) -> None:
    from click.testing import CliRunner

    from hydracc.cli import main

    convert(tiny_checkpoint("llama-gqa"), tmp_path / "conv", full_ratio=0.5, strategy="even")
    for args in (["convert", str(tmp_path / "conv"), "-o", str(tmp_path / "again")],
                 ["convert", str(tmp_path / "conv"), "--plan", "--strategy", "even"],
                 ["analyze", str(tmp_path / "conv"), "--calib-samples", "2", "--seq-len", "16"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2 and "already converted by hydracc" in res.output, res.output
    assert not (tmp_path / "again").exists()
