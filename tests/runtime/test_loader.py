"""Load back: hydracc.load(OUT) runs the hybrid; all-full is the original bit for bit."""

import json

import pytest
import torch
from helpers import FAMILIES, load_original, use_oracle

import hydracc
from hydracc.convert import convert
from hydracc.errors import CheckpointError


@pytest.mark.parametrize("name", list(FAMILIES))
def test_all_full_plan_gives_identical_logits(tiny_checkpoint, tmp_path, name: str) -> None:
    src = tiny_checkpoint(name)
    convert(src, tmp_path / "out", full_ratio=1.0, strategy="even")
    ids = torch.randint(0, 64, (2, 13))
    with torch.no_grad():
        assert torch.equal(hydracc.load(tmp_path / "out")(ids).logits, load_original(src)(ids).logits)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-mha", "gpt2-mha", "qwen3-mqa"])
@pytest.mark.parametrize("permute", [True, False], ids=["permuted", "unpermuted"])
def test_mixed_plan_matches_oracle_and_graph(tiny_checkpoint, tmp_path, name: str, permute: bool) -> None:
    src = tiny_checkpoint(name)
    result = convert(src, tmp_path / "out", full_ratio=0.5, strategy="even", permute=permute, linear_kind="elu")
    ids = torch.randint(0, 64, result.inspection.captured.input_shape)
    kinds = {lp.layer: lp.kinds for lp in result.plan.layers}
    converted = hydracc.load(tmp_path / "out")
    with torch.no_grad():
        got = converted(ids).logits
        expected = use_oracle(load_original(src), kinds)(ids).logits
        # the rewritten graph (with the same weight edits) computes the same as the runtime
        state = {n: result.rewrite.context.weight_edits.apply(n, t) for n, t in load_original(src).state_dict().items()}
        graph = result.inspection.captured.run(state, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graph, got, rtol=1e-5, atol=1e-5)
    section = json.loads((tmp_path / "out" / "config.json").read_text())["hydra"]
    assert section["format_version"] == 1 and section["plan"]["layers"][0]["heads"]
    for entry in section["layers"]:  # saved kinds, read through head_order, are the plan's
        assert [kinds[entry["layer"]][i] for i in entry["head_order"]] == entry["kinds"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_checkpoint(tiny_checkpoint, tmp_path, dtype) -> None:
    src = tiny_checkpoint("llama-gqa", dtype=dtype)
    convert(src, tmp_path / "out", full_ratio=0.5, strategy="even")
    model = hydracc.load(tmp_path / "out")
    assert next(model.parameters()).dtype == dtype
    with torch.no_grad():
        logits = model(torch.randint(0, 64, (1, 9))).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_sharded_input_and_output(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa", shard="20KB")
    assert (src / "model.safetensors.index.json").exists()
    result = convert(src, tmp_path / "out", full_ratio=1.0, strategy="even", max_shard_bytes=30_000)
    names = sorted(p.name for p in result.files)
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(hydracc.load(tmp_path / "out")(ids).logits, load_original(src)(ids).logits)


def test_load_refuses_unconverted(tiny_checkpoint) -> None:
    with pytest.raises(CheckpointError, match="not a hydracc-converted checkpoint"):
        hydracc.load(tiny_checkpoint("llama-gqa"))


def test_decode_with_transformers_cache_matches_full_recompute(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", full_ratio=0.5, strategy="even")
    model = hydracc.load(tmp_path / "out")
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        again = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(out, again)


@pytest.fixture(scope="module")
def truncated_conversion(tmp_path_factory):
    from helpers import ROOT

    from hydracc.convert import convert

    out = tmp_path_factory.mktemp("trunc") / "conv"
    convert(ROOT / "examples" / "tiny-llama", out, full_ratio=0.25, strategy="even")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return out


@pytest.mark.parametrize("command", [["eval", "--task", "ppl"], ["generate", "--prompt", "hi"], ["export-onnx"]])
def test_a_truncated_converted_checkpoint_is_bad_input(truncated_conversion, command) -> None:
    from click.testing import CliRunner

    from hydracc.cli import main

    res = CliRunner().invoke(main, [command[0], str(truncated_conversion), *command[1:]])
    assert res.exit_code == 2, res.output
    assert "model.safetensors" in res.output and "internal error" not in res.output
    assert not (truncated_conversion / "onnx").exists()


@pytest.mark.parametrize("command", [["eval"], ["generate", "--prompt", "hi"], ["export-onnx"]])
def test_a_missing_path_says_so(tmp_path, command) -> None:
    from click.testing import CliRunner

    from hydracc.cli import main

    res = CliRunner().invoke(main, [command[0], str(tmp_path / "nowhere"), *command[1:]])
    assert res.exit_code == 2 and "does not exist" in res.output, res.output
    assert "cannot write" not in res.output  # the missing input, not an output folder it would have made
