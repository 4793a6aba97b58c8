"""ONNX export: prefill and decode graphs over the hybrid cache, checked by onnxruntime; a broken export fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from hydracc.cli import main
from hydracc.convert import convert

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from hydracc.export.onnx import ExportError, check_onnx, export_onnx  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("name", "ratio"), [("llama-gqa", 0.5), ("gpt2-mha", 0.25), ("qwen3-mqa", 0.0)])
def test_export_matches_torch_prefill_and_decode(tiny_checkpoint, tmp_path, name, ratio) -> None:
    convert(tiny_checkpoint(name), tmp_path / "conv", full_ratio=ratio, strategy="even", linear_kind="elu")
    report = export_onnx(tmp_path / "conv", atol=1e-4, check_tokens=6)
    assert report.path == tmp_path / "conv" / "onnx"
    assert report.files == ["decode.onnx", "export.json", "prefill.onnx"]
    assert report.prefill_max_diff <= 1e-4 and report.decode_max_diff <= 1e-4 and report.decoded_tokens == 6
    meta = json.loads((report.path / "export.json").read_text())
    graph = onnx.load(str(report.path / "decode.onnx"))
    assert [i.name for i in graph.graph.input] == meta["inputs"]["decode"]
    batch_dims = {i.type.tensor_type.shape.dim[0].dim_param for i in graph.graph.input}
    assert len(batch_dims) == 1 and "" not in batch_dims  # one dynamic batch dimension everywhere
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)  # standard operators only


def test_a_broken_export_is_caught(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "conv", full_ratio=0.5, strategy="even")
    report = export_onnx(tmp_path / "conv")
    model = onnx.load(str(report.path / "prefill.onnx"))
    target = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight
    arr = onnx.numpy_helper.to_array(target).copy()
    arr.flat[0] += 1.0
    target.CopyFrom(onnx.numpy_helper.from_array(arr, target.name))
    onnx.save(model, str(report.path / "prefill.onnx"))
    with pytest.raises(ExportError, match="prefill graph differs"):
        check_onnx(report.path, tmp_path / "conv")


def test_cli_fails_above_atol_and_writes_nothing(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "conv", full_ratio=0.5, strategy="even")
    res = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "conv"), "--atol", "0", "--json"])
    assert res.exit_code == 2 and "differs" in json.loads(res.stdout)["error"]
    assert not (tmp_path / "conv" / "onnx").exists()
    assert not [p for p in (tmp_path / "conv").iterdir() if p.name.startswith(".")]
    res = CliRunner().invoke(main, ["convert", str(tiny_checkpoint("llama-gqa")), "-o", str(tmp_path / "c2"), "--strategy", "even",
                                    "--linear-kind", "gdn", "--calib-samples", "2", "--seq-len", "16", "--onnx", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["onnx"]["decoded_tokens"] == 8 and (tmp_path / "c2" / "onnx" / "decode.onnx").exists()


def test_external_data_above_the_size_limit(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    import hydracc.export.onnx as ox

    monkeypatch.setattr(ox, "PROTOBUF_LIMIT", 1024)  # pretend the tiny model is huge
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "conv", full_ratio=0.5, strategy="even")
    report = export_onnx(tmp_path / "conv", check_tokens=2)
    assert {"prefill.onnx.data", "decode.onnx.data"} <= set(report.files), report.files
    # the weights (~90 KB of fp32) live beside each graph, and onnxruntime read them for the check
    assert (report.path / "prefill.onnx.data").stat().st_size > 80_000


def test_output_cannot_replace_the_checkpoint(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "conv", full_ratio=0.5, strategy="even")
    res = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "conv"), "-o", str(tmp_path / "conv"), "--force"])
    assert res.exit_code == 2 and "would replace" in res.output
    assert (tmp_path / "conv" / "model.safetensors").exists()


def test_force_never_removes_what_hydracc_did_not_write(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "conv", full_ratio=0.5, strategy="even")
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", str(work)):  # the current folder, by any name
        res = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "conv"), "-o", target, "--force"])
        assert res.exit_code == 2 and "refusing to replace" in res.output, res.output
    (work / "sub").mkdir()
    (work / "sub" / "notes.txt").write_text("mine too")
    res = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "conv"), "-o", "sub", "--force"])
    assert res.exit_code == 2 and "hydracc did not write it" in res.output
    res = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "conv"), "-o", "precious.txt", "--force"])
    assert res.exit_code == 2 and "is a file" in res.output  # found before the export, not after it
    assert sorted(p.name for p in work.iterdir()) == ["precious.txt", "sub"]
    assert (work / "precious.txt").read_text() == "mine" and (work / "sub" / "notes.txt").read_text() == "mine too"
    # an earlier export of hydracc's own is replaced with --force
    first = export_onnx(tmp_path / "conv", check_tokens=1)
    again = export_onnx(tmp_path / "conv", check_tokens=1, force=True)
    assert again.path == first.path and (again.path / "export.json").is_file()
    assert not [p for p in (tmp_path / "conv").iterdir() if p.name.startswith(".")]


def test_hedgehog_with_fusion_exports(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    convert(src, tmp_path / "hh", full_ratio=0.5, strategy="even", linear_kind="hedgehog", seq_len=16, calib_samples=2)
    report = export_onnx(tmp_path / "hh", atol=1e-4, check_tokens=4)
    assert report.prefill_max_diff <= 1e-4 and report.decode_max_diff <= 1e-4
    meta = json.loads((report.path / "export.json").read_text())
    assert "past.0.hedgehog.state" in meta["inputs"]["decode"]


def _ops(path) -> set[str]:
    def walk(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.g.node:
                    yield from walk(attr.g)
    return {n.op_type for n in walk(onnx.load(str(path)).graph)}


def test_gdn_exports_with_a_scan_over_tokens(tiny_checkpoint, tmp_path) -> None:
    """gdn's recurrence becomes an ONNX Scan, so the prefill graph takes any length: a prompt of
    another length than the check's is compared here too."""
    src = tiny_checkpoint("llama-gqa")
    convert(src, tmp_path / "gdn", full_ratio=0.5, strategy="even", linear_kind="gdn", seq_len=16, calib_samples=2)
    report = export_onnx(tmp_path / "gdn", atol=1e-4, check_tokens=4)
    assert report.prefill_max_diff <= 1e-4 and report.decode_max_diff <= 1e-4
    assert "Scan" in _ops(report.path / "prefill.onnx")
    meta = json.loads((report.path / "export.json").read_text())
    assert "past.0.gdn.state" in meta["inputs"]["decode"] and "past.0.gdn.norm" not in meta["inputs"]["decode"]
    import onnxruntime as ort
    import torch

    import hydracc

    sess = ort.InferenceSession(str(report.path / "prefill.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (1, 131), generator=torch.Generator().manual_seed(1))
    got = sess.run(["logits"], {"input_ids": ids.numpy(), "position_ids": torch.arange(131)[None].numpy()})[0]
    with torch.no_grad():
        want = hydracc.load(tmp_path / "gdn")(ids).logits.numpy()
    assert np.abs(got - want).max() < 1e-4


def _plan_file(src, tmp_path, kinds: list[list[str]], sink: int, window: int):
    plan = tmp_path / "plan.json"
    res = CliRunner().invoke(main, ["convert", str(src), "--plan", "--strategy", "even", "--plan-out", str(plan), "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads(plan.read_text())
    for layer, names in zip(doc["layers"], kinds):
        layer["heads"] = [{"kind": k, "params": {"sink": sink, "window": window} if k == "streaming" else {}} for k in names]
    plan.write_text(json.dumps(doc))
    return plan


def test_streaming_exports_with_a_fixed_ring(tiny_checkpoint, tmp_path) -> None:
    """The window is a ring of sink + window - 1 rows with positions: a constant-shape decode input;
    the check's prompt is longer than the ring, so it wraps in prefill and again while decoding."""
    src = tiny_checkpoint("llama-gqa")
    kinds = [["streaming", "streaming", "full", "elu"], ["elu", "streaming", "streaming", "streaming"]]
    convert(src, tmp_path / "st", plan_file=_plan_file(src, tmp_path, kinds, sink=2, window=5))
    report = export_onnx(tmp_path / "st", atol=1e-4, check_tokens=9)
    assert report.prefill_max_diff <= 1e-4 and report.decode_max_diff <= 1e-4
    graph = onnx.load(str(report.path / "decode.onnx")).graph
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert shapes["past.0.window.positions"] == [2 + 5 - 1]
    assert shapes["past.1.window.keys"][1:] == [2, 2 + 5 - 1, 8]  # both KV heads, 6 rows, head dim
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)


def test_every_kind_in_one_model_exports(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    kinds = [["full", "full", "gdn", "streaming"], ["hedgehog", "elu", "gdn", "streaming"]]
    convert(src, tmp_path / "mix", plan_file=_plan_file(src, tmp_path, kinds, sink=1, window=4))
    report = export_onnx(tmp_path / "mix", atol=1e-4, check_tokens=5)
    assert report.prefill_max_diff <= 1e-4 and report.decode_max_diff <= 1e-4


def test_float16_export(tiny_checkpoint, tmp_path) -> None:
    """fp16 weights and activations (states fp32) run in onnxruntime's CPU kernels within the fp16 bound."""
    src = tiny_checkpoint("llama-gqa")
    kinds = [["full", "elu", "gdn", "streaming"], ["full", "full", "hedgehog", "elu"]]
    convert(src, tmp_path / "mix", plan_file=_plan_file(src, tmp_path, kinds, sink=1, window=4))
    res = CliRunner().invoke(main, ["export-onnx", str(tmp_path / "mix"), "--dtype", "float16", "--check-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["atol"] == 2e-2 and report["prefill_max_abs_diff"] <= 2e-2 and report["decode_max_abs_diff"] <= 2e-2
    meta = json.loads((tmp_path / "mix" / "onnx" / "export.json").read_text())
    assert meta["dtype"] == "float16"
    graph = onnx.load(str(tmp_path / "mix" / "onnx" / "decode.onnx")).graph
    types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    assert types["past.0.keys"] == onnx.TensorProto.FLOAT16 and types["past.0.elu.state"] == onnx.TensorProto.FLOAT


def test_a_full_disk_while_exporting_is_an_output_error(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    from hydracc.errors import OutputError
    from hydracc.export import onnx as onnx_mod

    convert(tiny_checkpoint("llama-gqa"), tmp_path / "conv", full_ratio=0.5, strategy="even")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_mod, "_export_one", full)
    with pytest.raises(OutputError, match="No space left on device") as exc:
        onnx_mod.export_onnx(tmp_path / "conv", tmp_path / "onnx")
    assert exc.value.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no output, no temporary folder left
