"""Tests for hydracc.emit.writer: the streamed, atomic, deterministic checkpoint writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import build_tiny_model

import hydracc.emit.writer as emit
from hydracc.emit.writer import CheckpointWriter, hydracc_made, parse_size
from hydracc.errors import OutputError
from hydracc.frontend.checkpoint import open_checkpoint

CONFIG = {"model_type": "llama", "hidden_size": 4, "architectures": ["LlamaForCausalLM"]}


def make_tensors(n: int = 6, numel: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return {f"layers.{i}.weight": torch.randn(numel, generator=g).to(dtypes[i % 3]) for i in range(n)}


def write(out: Path, tensors: dict[str, torch.Tensor], **kw) -> CheckpointWriter:
    with CheckpointWriter(out, **kw) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.write_json("config.json", CONFIG)
    return w


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if "hydracc-" in p.name)


def assert_round_trip(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(out) as ck:
        assert ck.names() == sorted(tensors)
        for name, t in tensors.items():
            got = ck.get(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t), name


# ---------------------------------------------------------------------------- round trips
def test_single_shard_round_trip(tmp_path):
    tensors = make_tensors()
    out = tmp_path / "out"
    w = write(out, tensors)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert w.written_files() == [out / "model.safetensors", out / "config.json"]
    assert_round_trip(out, tensors)
    assert leftovers(tmp_path) == []
    with open_checkpoint(out) as ck:
        assert ck.config == CONFIG
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_multi_shard_round_trip_and_index(tmp_path):
    tensors = make_tensors(n=7, numel=10)  # 40, 20, 20, 40, 20, 20, 40 bytes
    out = tmp_path / "out"
    w = write(out, tensors, max_shard_bytes=60)
    # greedy packing: [40 20] [20 40] [20 20] [40]
    shards = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index_name = "model.safetensors.index.json"
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, index_name, "config.json"])
    assert w.written_files() == [out / s for s in [*shards, index_name, "config.json"]]
    assert_round_trip(out, tensors)

    text = (out / index_name).read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in tensors.values())}
    names = list(tensors)
    expected = dict(zip(names, [shards[i] for i in (0, 0, 1, 1, 2, 2, 3)], strict=True))
    assert index["weight_map"] == expected
    with open_checkpoint(out) as ck:  # the index agrees with where the tensors really are
        for name, fname in index["weight_map"].items():
            assert ck.info(name).file == out / fname


def test_tensor_bigger_than_shard_gets_its_own(tmp_path):
    tensors = {"a": torch.ones(2), "big": torch.ones(100), "c": torch.ones(2)}
    out = tmp_path / "out"
    write(out, tensors, max_shard_bytes="100B")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors",
    }
    assert_round_trip(out, tensors)


def test_shards_are_flushed_while_streaming(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out, max_shard_bytes=100) as w:
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.hydracc-tmp-")]
        w.add("a", torch.ones(20))  # 80 bytes: buffered
        assert [p.name for p in tmp.iterdir()] == [emit.OWNER_MARKER]
        w.add("b", torch.ones(20))  # would overflow: "a" is saved now
        assert len(list(tmp.iterdir())) == 2
        assert not out.exists()
        w.write_json("config.json", CONFIG)
    assert_round_trip(out, {"a": torch.ones(20), "b": torch.ones(20)})


def test_views_and_shared_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(3, 3)
    tensors = {
        "transposed": base.t(),
        "row_slice": base[1:3],
        "col_slice": base[:, 2],
        "whole": base,
        "tied_a": tied,
        "tied_b": tied,
        "expanded": torch.ones(1, 3).expand(4, 3),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    out = tmp_path / "out"
    write(out, tensors)
    assert_round_trip(out, tensors)
    assert torch.equal(base, torch.arange(24, dtype=torch.float32).reshape(4, 6))  # untouched


def test_llama_state_dict_round_trip_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("llama", 4, 2).to(torch.bfloat16)
    sd = model.state_dict()
    out = tmp_path / "llama"
    with CheckpointWriter(out, max_shard_bytes="20KB") as w:
        for name, t in sd.items():
            w.add(name, t)
        w.write_json("config.json", model.config.to_dict())
    assert (out / "model.safetensors.index.json").is_file()
    assert_round_trip(out, sd)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for name, t in loaded.state_dict().items():
        assert loaded.dtype == torch.bfloat16 and torch.equal(t, sd[name]), name


def test_byte_identical_output(tmp_path):
    tensors = make_tensors(n=9)
    digests = []
    for run in ("one", "two"):
        out = tmp_path / run
        with CheckpointWriter(out, max_shard_bytes=50) as w:
            for name, t in tensors.items():
                w.add(name, t.clone())
            w.write_json("config.json", dict(reversed(CONFIG.items())) if run == "two" else CONFIG)
        digests.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert len(digests[0]) > 3
    assert digests[0] == digests[1]


def test_write_json_format_and_copy_file(tmp_path):
    src = tmp_path / "tok.json"
    payload = b'{"b":1,  "a":2}\r\n\x00binary'
    src.write_bytes(payload)
    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        w.add("x", torch.ones(1))
        assert w.write_json("hydra.json", {"b": [1, 2], "a": "é"}) == out / "hydra.json"
        w.copy_file(src, "tokenizer.json")
        w.copy_file(src)  # keeps its name
    assert (out / "hydra.json").read_text(encoding="utf-8") == ('{\n  "a": "é",\n  "b": [\n    1,\n    2\n  ]\n}\n')
    assert (out / "tokenizer.json").read_bytes() == payload
    assert (out / "tok.json").read_bytes() == payload
    assert w.written_files()[-3:] == [out / "hydra.json", out / "tokenizer.json", out / "tok.json"]


def test_bad_side_files(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        for bad in ("", "..", "sub/x.json", "model.safetensors", "model-00001-of-00002.safetensors"):
            with pytest.raises(ValueError, match="plain file name|reserved"):
                w.write_json(bad, {})
        w.write_json("a.json", {})
        with pytest.raises(ValueError, match="already written"):
            w.write_json("a.json", {})
        with pytest.raises(OutputError, match="not a file"):
            w.copy_file(tmp_path / "missing.txt")


def test_duplicate_name_and_bad_tensors(tmp_path):
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("x", torch.ones(1))
        with pytest.raises(ValueError, match="duplicate tensor name 'x'"):
            w.add("x", torch.zeros(1))
        with pytest.raises(ValueError, match="no data"):
            w.add("m", torch.empty(2, device="meta"))
        with pytest.raises(TypeError):
            w.add("n", [1.0])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["x"]


def test_written_files_only_after_close(tmp_path):
    w = CheckpointWriter(tmp_path / "out")
    with w:
        w.add("x", torch.ones(1))
        with pytest.raises(RuntimeError, match="after the writer closed"):
            w.written_files()
    assert all(p.is_file() for p in w.written_files())
    with pytest.raises(RuntimeError):
        w.add("y", torch.ones(1))


def test_explicit_close_without_with(tmp_path):
    out = tmp_path / "out"
    w = CheckpointWriter(out)
    w.add("x", torch.ones(3))
    w.close()
    assert w.written_files() == [out / "model.safetensors"]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- atomicity
class Boom(Exception):
    pass


def test_exception_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Boom), CheckpointWriter(out, max_shard_bytes=8) as w:
        w.add("a", torch.ones(2))
        w.add("b", torch.ones(2))  # a shard is already on disk in the temp folder
        w.write_json("config.json", CONFIG)
        raise Boom
    assert not out.exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError, match="aborted"):
        w.close()


def test_force_keeps_old_output_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("precious")
    (out / "config.json").write_text('{"hydra": {}}')  # an earlier hydracc output
    with pytest.raises(Boom), CheckpointWriter(out, force=True) as w:
        w.add("a", torch.ones(2))
        raise Boom
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]
    assert (out / "README.md").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_force_replaces_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("stale")
    (out / "config.json").write_text('{"hydra": {}}')  # an earlier hydracc output
    tensors = make_tensors(n=2)
    with CheckpointWriter(out, force=True) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.write_json("config.json", CONFIG)
        assert (out / "README.md").read_text() == "stale"  # replaced only at the very end
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == CONFIG
    assert_round_trip(out, tensors)
    assert leftovers(tmp_path) == []


def test_failed_swap_restores_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("precious")
    (out / "config.json").write_text('{"hydra": {}}')  # an earlier hydracc output
    real_rename = os.rename

    def flaky_rename(src, dst):
        if Path(src).name.startswith(".out.hydracc-tmp-"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(emit.os, "rename", flaky_rename)
    with pytest.raises(OutputError, match="cannot move the output into place"):
        with CheckpointWriter(out, force=True) as w:
            w.add("a", torch.ones(2))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json"]
    assert (out / "README.md").read_text() == "precious"
    assert leftovers(tmp_path) == []


def test_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="already exists") as ei:
        CheckpointWriter(out)
    assert "--force" in str(ei.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder made


def test_output_appearing_meanwhile_is_not_clobbered(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="appeared"), CheckpointWriter(out) as w:
        w.add("a", torch.ones(2))
        out.mkdir()
    assert list(out.iterdir()) == []
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
def test_output_is_a_file(tmp_path, force):
    out = tmp_path / "out"
    out.write_text("not a folder")
    with pytest.raises(OutputError, match="is a file"):
        CheckpointWriter(out, force=force)
    assert out.read_text() == "not a folder"


def test_parent_missing_or_not_a_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        CheckpointWriter(tmp_path / "no" / "out")
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="does not exist"):
        CheckpointWriter(tmp_path / "f" / "out")


def test_parent_not_writable(tmp_path, monkeypatch):
    # running as root makes chmod useless, so simulate what os.access would report
    monkeypatch.setattr(emit.os, "access", lambda *a, **k: False)
    with pytest.raises(OutputError, match="not writable"):
        CheckpointWriter(tmp_path / "out")


def test_force_refuses_a_folder_hydracc_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "config.json").write_text('{"model_type": "llama"}')  # a plain checkpoint is not hydracc's either
    with pytest.raises(OutputError, match="hydracc did not write it"):
        CheckpointWriter(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_force_refuses_dangerous_targets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="refusing to replace"):
        CheckpointWriter(tmp_path, force=True)


# ---------------------------------------------------------------------------- parse_size
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("500MiB", 500 * 2**20),
        ("20KB", 20_000),
        ("3KiB", 3072),
        ("2 mb", 2 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("123B", 123),
        ("123", 123),
        (" 7 kb ", 7000),
        (42, 42),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "", "GB", "-1GB", "0", "0KB", "5 G", "abc", "1e3", "5TB", -3])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_size_type_errors():
    with pytest.raises(TypeError):
        parse_size(True)
    with pytest.raises(TypeError):
        parse_size(5.0)  # type: ignore[arg-type]


def test_writer_takes_size_strings(tmp_path):
    assert CheckpointWriter(tmp_path / "a", max_shard_bytes="2KiB").max_shard_bytes == 2048
    with pytest.raises(ValueError, match="cannot parse size"):
        CheckpointWriter(tmp_path / "b", max_shard_bytes="lots")


def test_files_get_the_modes_save_pretrained_gives(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        with CheckpointWriter(out, max_shard_bytes=64) as w:
            for name, t in make_tensors(n=3).items():
                w.add(name, t)
            w.write_json("config.json", CONFIG)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes
    assert out.stat().st_mode & 0o777 == 0o755


def test_full_disk_is_bad_output_not_a_crash(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left") as info, CheckpointWriter(out) as w:
        w.add("a", torch.ones(2))
    assert info.value.exit_code == 2 and "free space" in str(info.value)
    assert not out.exists() and leftovers(tmp_path) == []


def _marked(folder: Path, pid: int, host: str | None = None) -> Path:
    import socket

    folder.mkdir()
    (folder / "partial.bin").write_bytes(b"x" * 10)
    (folder / emit.OWNER_MARKER).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": 0}))
    return folder


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = _marked(tmp_path / ".out.hydracc-tmp-dead0001", dead.pid)
        running = _marked(tmp_path / ".out.hydracc-tmp-live0001", alive.pid)
        elsewhere = _marked(tmp_path / ".out.hydracc-tmp-host0001", dead.pid, host="another-machine")
        unmarked = tmp_path / ".out.hydracc-tmp-nomark01"
        unmarked.mkdir()
        other_output = _marked(tmp_path / ".other.hydracc-tmp-dead0002", dead.pid)
        with CheckpointWriter(tmp_path / "out") as w:
            w.add("a", torch.ones(2))
        assert not stale.exists()
        assert running.exists() and elsewhere.exists() and unmarked.exists() and other_output.exists()
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]  # no marker in the output
    finally:
        alive.kill()
        alive.wait()


def test_a_run_killed_while_writing_is_cleaned_up_by_the_next(tmp_path):
    import subprocess
    import sys

    script = (
        "import os, signal, torch\n"
        "from hydracc.emit.writer import CheckpointWriter\n"
        f"w = CheckpointWriter({str(tmp_path / 'out')!r}, max_shard_bytes=64)\n"
        "w.__enter__()\n"
        "for i in range(4): w.add(f't{i}', torch.ones(32))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == -9
    left = leftovers(tmp_path)
    assert len(left) == 1 and (tmp_path / left[0] / emit.OWNER_MARKER).is_file()
    with CheckpointWriter(tmp_path / "out") as w:
        w.add("a", torch.ones(2))
    assert leftovers(tmp_path) == []


def test_json_files_are_strict_json(tmp_path):
    out = tmp_path / "out"
    with CheckpointWriter(out) as w:
        w.add("a", torch.ones(2))
        w.write_json("config.json", {"scores": [1.0, float("nan"), float("inf")], "nested": {"x": -float("inf")}, "t": (1, 2)})
    text = (out / "config.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"scores": [1.0, None, None], "nested": {"x": None}, "t": [1, 2]}


def test_force_refuses_a_hydracc_output_the_user_added_files_to(tmp_path):
    """A converted folder someone added notes (or a git repository) to is no longer only hydracc's."""
    out = tmp_path / "conv"
    with CheckpointWriter(out) as w:
        w.add("w", torch.ones(2))
        w.write_json("config.json", {"model_type": "llama", "hydra": {}})
        w.write_text("README.md", "card")
    assert hydracc_made(out)
    (out / "onnx").mkdir()
    (out / "onnx" / "export.json").write_text('{"format": "hydracc-onnx"}')
    (out / "onnx" / "decode.onnx").write_bytes(b"x")
    assert hydracc_made(out)  # its own export inside is still hydracc's
    (out / "notes.txt").write_text("precious")
    (out / ".git").mkdir()
    with pytest.raises(OutputError, match=r"hydracc did not write it all \(\.git, notes\.txt are not hydracc's\)"):
        CheckpointWriter(out, force=True)
    assert (out / "notes.txt").read_text() == "precious" and (out / ".git").is_dir()
    (out / "notes.txt").unlink()
    (out / ".git").rmdir()
    (out / "onnx" / "mine.txt").write_text("x")  # a foreign file inside the export counts too
    assert not hydracc_made(out)
