"""Tests for hydracc.frontend.checkpoint: lazy, header-validated loading of safetensors checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import safetensors
import torch
from helpers import build_tiny_model
from safetensors.torch import save_file

import hydracc.frontend.checkpoint
from hydracc.errors import CheckpointError
from hydracc.frontend.checkpoint import Checkpoint, TensorInfo, open_checkpoint

CONFIG = {"model_type": "llama", "hidden_size": 4}


def write_config(folder: Path, config: dict | None = None) -> None:
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))


def make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, 4, generator=g),
        "a.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(2, 2, generator=g).to(torch.float16),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture
def single(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = make_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    write_config(tmp_path)
    return tmp_path, tensors


@pytest.fixture(scope="module")
def llama_dirs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[torch.dtype, tuple[Path, dict]]:
    """Real sharded save_pretrained output of a tiny Llama, in three dtypes."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = build_tiny_model("llama", 4, 2).to(dtype)
        d = tmp_path_factory.mktemp(f"llama-{str(dtype).split('.')[-1]}")
        model.save_pretrained(d, max_shard_size="20KB")
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out[dtype] = (d, sd)
    return out


@pytest.fixture
def llama_copy(llama_dirs, tmp_path: Path) -> Path:
    """A private copy of the fp32 sharded checkpoint that a test may damage."""
    dst = tmp_path / "llama"
    shutil.copytree(llama_dirs[torch.float32][0], dst)
    return dst


def no_data_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any tensor-data read (safe_open or the checkpoint's own data path) fail loudly."""

    def boom(*a, **k):
        raise AssertionError("data read: tensor data was read where only headers should be")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    monkeypatch.setattr(hydracc.frontend.checkpoint, "_read_tensor_bytes", boom)


# ---------------------------------------------------------------------------- happy paths
def test_single_file_folder(single):
    folder, tensors = single
    ck = open_checkpoint(folder)
    assert isinstance(ck, Checkpoint)
    assert ck.root == folder
    assert ck.config == CONFIG
    assert ck.files == [folder / "model.safetensors"]
    assert ck.names() == sorted(tensors)
    assert ck.dtypes() == {torch.float32, torch.bfloat16, torch.float16}
    assert ck.total_bytes() == sum(t.nbytes for t in tensors.values())
    info = ck.info("a.weight")
    assert info == TensorInfo("a.weight", (5,), torch.bfloat16, folder / "model.safetensors", 10, info.offset)
    assert info.offset > 8  # after the 8-byte length and the JSON header
    with pytest.raises(AttributeError):
        info.shape = (1,)  # frozen
    with pytest.raises(KeyError, match="a.weight"):
        ck.info("a.weight_")  # suggestion of the close match
    for name, t in tensors.items():
        got = ck.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    ck.close()


def test_metadata_needs_no_data_reads(single, monkeypatch):
    folder, tensors = single
    no_data_reads(monkeypatch)
    ck = open_checkpoint(folder)
    assert [ck.info(n).shape for n in ck.names()] == [tuple(tensors[n].shape) for n in sorted(tensors)]
    with pytest.raises(AssertionError, match="data read"):
        ck.get("a.weight")


def test_file_path_given_directly(tmp_path):
    tensors = make_tensors()
    f = tmp_path / "weights.safetensors"
    save_file(tensors, f)
    write_config(tmp_path)
    with open_checkpoint(f) as ck:
        assert ck.root == tmp_path and ck.files == [f]
        assert ck.names() == sorted(tensors)
        assert torch.equal(ck.get("b.weight"), tensors["b.weight"])


def test_folder_with_one_oddly_named_file(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "weights.safetensors")
    write_config(tmp_path)
    with open_checkpoint(str(tmp_path)) as ck:
        assert ck.files == [tmp_path / "weights.safetensors"]
        assert ck.names() == ["x"]


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.bfloat16, torch.float16],
    ids=["fp32", "bf16", "fp16"],
)
def test_sharded_llama_matches_state_dict(llama_dirs, dtype):
    folder, sd = llama_dirs[dtype]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    with open_checkpoint(folder) as ck:
        assert len(ck.files) > 1
        assert ck.files == sorted(folder / f for f in set(index["weight_map"].values()))
        assert ck.config["model_type"] == "llama"
        assert ck.names() == sorted(sd)
        assert ck.dtypes() == {dtype}
        assert ck.total_bytes() == index["metadata"]["total_size"]
        for name, t in sd.items():
            info = ck.info(name)
            assert info.shape == tuple(t.shape) and info.dtype == dtype
            assert info.nbytes == t.nbytes
            assert info.file == folder / index["weight_map"][name]
            got = ck.get(name)
            assert got.dtype == dtype and torch.equal(got, t), name


def test_index_or_config_path_opens_the_folder(llama_dirs):
    folder, sd = llama_dirs[torch.float32]
    for p in (folder / "model.safetensors.index.json", folder / "config.json"):
        with open_checkpoint(p) as ck:
            assert ck.names() == sorted(sd)


def test_sha256_matches_hashlib(llama_dirs):
    folder, _ = llama_dirs[torch.bfloat16]
    with open_checkpoint(folder) as ck:
        got = ck.sha256()
    expected_files = {"config.json", "model.safetensors.index.json"} | {p.name for p in folder.glob("*.safetensors")}
    assert set(got) == expected_files
    for name, digest in got.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name


def test_sha256_streams_files_larger_than_a_chunk(tmp_path):
    big = torch.arange(700_000, dtype=torch.float32)  # 2.8 MB: several 1-MiB chunks
    save_file({"big": big}, tmp_path / "model.safetensors")
    write_config(tmp_path)
    with open_checkpoint(tmp_path) as ck:
        got = ck.sha256()
    assert set(got) == {"config.json", "model.safetensors"}
    data = (tmp_path / "model.safetensors").read_bytes()
    assert got["model.safetensors"] == hashlib.sha256(data).hexdigest()


def test_close_releases_handles(single):
    folder, tensors = single
    with open_checkpoint(folder) as ck:
        t = ck.get("b.weight")
    assert torch.equal(t, tensors["b.weight"])  # tensors stay valid after close
    with pytest.raises(RuntimeError, match="closed"):
        ck.get("b.weight")
    assert ck.names() == sorted(tensors)  # metadata still available


# ---------------------------------------------------------------------------- errors
def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")


def test_no_config(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json") as ei:
        open_checkpoint(tmp_path)
    assert str(tmp_path) in str(ei.value) and "hint" in str(ei.value)
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"hidden_size": 4}', "no 'model_type'"),
        ('["llama"]', "JSON object"),
    ],
    ids=["bad-json", "no-model-type", "not-object"],
)
def test_bad_config(tmp_path, text, match):
    save_file({"x": torch.ones(2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match) as ei:
        open_checkpoint(tmp_path)
    assert "config.json" in str(ei.value)


def test_folder_without_safetensors(tmp_path):
    write_config(tmp_path)
    with pytest.raises(CheckpointError, match="no safetensors files"):
        open_checkpoint(tmp_path)


def test_folder_with_only_pickled_weights(tmp_path):
    write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickled") as ei:
        open_checkpoint(tmp_path)
    assert "safetensors" in str(ei.value)


def test_several_files_without_index(tmp_path):
    write_config(tmp_path)
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"y": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"2 safetensors files .*no model.safetensors.index"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_pickled_file_refused_without_reading(tmp_path, suffix, monkeypatch):
    write_config(tmp_path)
    f = tmp_path / f"pytorch_model{suffix}"
    f.write_bytes(b"\x80\x04anything")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match="requires safetensors") as ei:
        open_checkpoint(f)
    assert "pickled" in str(ei.value) and str(f) in str(ei.value)


def test_index_references_missing_shard(llama_copy):
    shard = sorted(llama_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="does not exist") as ei:
        open_checkpoint(llama_copy)
    assert shard.name in str(ei.value) and "index" in str(ei.value)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("{oops", "not valid JSON"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": {}}', "empty"),
        ('{"weight_map": {"x": 3}}', "not a file name"),
        ('{"weight_map": {"x": "../elsewhere.safetensors"}}', "outside"),
        ('{"weight_map": {"x": "pytorch_model-00001.bin"}}', "not a .safetensors"),
    ],
    ids=[
        "bad-json",
        "no-weight-map",
        "empty",
        "non-string",
        "escapes",
        "pickled-shard",
    ],
)
def test_malformed_index(llama_copy, doc, match):
    (llama_copy / "model.safetensors.index.json").write_text(doc)
    with pytest.raises(CheckpointError, match=match) as ei:
        open_checkpoint(llama_copy)
    assert "model.safetensors.index.json" in str(ei.value)


def test_index_disagrees_with_headers(llama_copy):
    path = llama_copy / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = "model.embed_tokens.weight"
    original = index["weight_map"][name]
    index["weight_map"][name] = next(f for f in files if f != original)
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"lists tensor '{name}'"):
        open_checkpoint(llama_copy)

    index["weight_map"]["ghost.weight"] = files[0]
    index["weight_map"][name] = original
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        open_checkpoint(llama_copy)


def test_tensor_in_two_shards(tmp_path):
    write_config(tmp_path)
    save_file({"x": torch.ones(2), "y": torch.ones(1)}, tmp_path / "s1.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "s2.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'x' appears in two shards") as ei:
        open_checkpoint(tmp_path)
    assert "s1.safetensors" in str(ei.value) and "s2.safetensors" in str(ei.value)


def test_one_shard_given_directly_is_refused(llama_dirs):
    folder, _ = llama_dirs[torch.float32]
    shards = sorted(folder.glob("model-*.safetensors"))
    shard = shards[0]
    with pytest.raises(CheckpointError, match=f"one of {len(shards)} shards") as ei:
        open_checkpoint(shard)
    assert "pass the folder" in str(ei.value)


@pytest.mark.parametrize("cut", [1, 100, "into-data-start", "into-header", "to-7-bytes"])
def test_truncated_file_detected_from_header(llama_copy, monkeypatch, cut):
    shard = min(llama_copy.glob("model-*.safetensors"))
    data = shard.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    keep = {
        "into-data-start": 8 + hlen + 3,
        "into-header": 8 + hlen // 2,
        "to-7-bytes": 7,
    }.get(cut, len(data) - cut if isinstance(cut, int) else 0)
    shard.write_bytes(data[:keep])
    no_data_reads(monkeypatch)  # detection must come from the header alone
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(llama_copy)
    msg = str(ei.value)
    assert str(shard) in msg
    assert "truncated" in msg or "too small" in msg or "header length" in msg
    if isinstance(cut, int) or cut == "into-data-start":
        header = json.loads(data[8 : 8 + hlen])
        entries = [(v["data_offsets"], k) for k, v in header.items() if k != "__metadata__"]
        first_cut = min((o, k) for o, k in entries if o[1] > keep - 8 - hlen)[1]
        assert "truncated" in msg and repr(first_cut) in msg  # the first tensor that lost bytes


def test_truncated_single_file(single):
    folder, _ = single
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(folder)


def test_trailing_garbage_detected(single):
    folder, _ = single
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="cover"):
        open_checkpoint(folder)


def _rewrite_header(f: Path, header_bytes: bytes, hlen: int | None = None) -> None:
    data = f.read_bytes()
    (old,) = struct.unpack("<Q", data[:8])
    n = len(header_bytes) if hlen is None else hlen
    f.write_bytes(struct.pack("<Q", n) + header_bytes + data[8 + old :])


def test_corrupt_header_not_json(single):
    folder, _ = single
    f = folder / "model.safetensors"
    data = f.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    f.write_bytes(data[:8] + b"\xff" * hlen + data[8 + hlen :])
    with pytest.raises(CheckpointError, match="header is not valid JSON") as ei:
        open_checkpoint(folder)
    assert str(f) in str(ei.value)


def test_corrupt_header_length(single):
    folder, _ = single
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(CheckpointError, match="header length says"):
        open_checkpoint(folder)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda e: e.update(shape=[3, "4"]), "bad shape"),
        (lambda e: e.update(data_offsets=[0]), "bad data_offsets"),
        (lambda e: e.update(shape=[3, 5]), "needs 60 bytes"),
        (lambda e: e.update(dtype="Q7"), "unknown dtype"),
    ],
    ids=["shape", "offsets", "size-mismatch", "dtype-tag"],
)
def test_corrupt_header_entries(single, mutate, match):
    folder, _ = single
    f = folder / "model.safetensors"
    data = f.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    mutate(header["b.weight"])
    _rewrite_header(f, json.dumps(header).encode())
    with pytest.raises(CheckpointError, match=match) as ei:
        open_checkpoint(folder)
    assert "'b.weight'" in str(ei.value)


@pytest.mark.parametrize(
    ("dtype", "label"),
    [
        (torch.int8, "int8"),
        (torch.float8_e4m3fn, "float8_e4m3fn"),
        (torch.float64, "float64"),
    ],
)
def test_unsupported_dtype(tmp_path, dtype, label):
    write_config(tmp_path)
    tensors = {"ok": torch.ones(2), "model.q.weight": torch.zeros(4, 4).to(dtype)}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"'model.q.weight' has dtype {label}") as ei:
        open_checkpoint(tmp_path)
    assert "float32, bfloat16, float16" in str(ei.value)


def test_empty_checkpoint_refused(tmp_path):
    write_config(tmp_path)
    save_file({}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no tensors"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_are_refused_at_first_read(tmp_path, dtype, bad):
    tensors = {"ok": torch.ones(3, dtype=dtype), "w": torch.tensor([[1.0, bad], [bad, 2.0]], dtype=dtype)}
    save_file(tensors, tmp_path / "model.safetensors")
    write_config(tmp_path)
    with open_checkpoint(tmp_path) as ck:
        assert torch.equal(ck.get("ok"), tensors["ok"])
        with pytest.raises(CheckpointError, match=r"'w' .* holds 2 NaN or infinite value\(s\) of 4") as info:
            ck.get("w")
        assert info.value.exit_code == 2 and "--allow-nonfinite" in str(info.value)
        ck.allow_nonfinite = True  # the explicit way through
        assert torch.equal(ck.get("w").isfinite(), tensors["w"].isfinite())


def test_nonfinite_count_in_chunks() -> None:
    from hydracc.frontend.checkpoint import count_nonfinite

    t = torch.zeros(1000)
    t[[3, 500, 999]] = float("nan")
    assert count_nonfinite(t, chunk=7) == 3 and count_nonfinite(t) == 3 and count_nonfinite(torch.zeros(0)) == 0
