"""ONNX export of a converted model: a prefill graph and a decode-step graph over the hybrid cache.

Design decisions:
- The exported module is the converted transformers model itself, run by a thin wrapper
  that turns explicit cache tensors into a ``HybridCache`` and back. Under the export
  attention implementation (``"hydracc_export"``) every layer attends through
  ``HybridStep.attend``, which is plain torch (index_select, SDPA with an explicit causal
  mask, the linear-attention step), so the graph holds only standard ONNX operators; no
  custom op needs a translation. The causal structure is built into ``attend``, so the
  export's mask function returns no mask, and positions are an explicit input.
- Cache tensors per layer, named ``past.L.keys``/``values`` (``[B, cached KV heads, P, D]``,
  only when some head of the layer is full), per linear kind present ``past.L.KIND.state``
  (fp32, ``[B, heads of that kind, F, Dv]``) and, but for gdn, ``past.L.KIND.norm``
  (``[B, heads, F]``), and for streaming heads ``past.L.window.keys``/``values`` (``[B, KV
  heads they read, sink + window - 1, D]``) with ``past.L.window.positions`` (``[sink + window -
  1]`` int64, the ring's absolute positions); outputs are named ``present.L.*``. The names are
  ``HybridLayer.cache_names``.
- Every kind exports. gdn's prefill runs its chunked form with the loop over chunks as an ONNX
  ``Scan`` (``kinds.gdn`` switches to it under ``torch.export``); streaming heads keep the
  hybrid cache's fixed ring of window rows, written by index arithmetic from the
  ``position_ids`` input, so the decode graph's window has a constant shape.
  Prefill takes ``input_ids``/``position_ids`` ``[B, T]``; decode also takes the past and
  one token per row. Batch, length and past length are dynamic.
- Every export is checked with onnxruntime on fresh random inputs against the torch model;
  the largest difference is reported and, above ``atol``, the export fails with an error
  (exit code 2 from the CLI) and nothing is left at the output path. The check also decodes
  a few tokens through the decode graph and compares them with hydracc's own decode.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hydracc.emit.writer import OWNER_MARKER, check_destination, make_temp_folder, swap_into_place
from hydracc.errors import CheckpointError, HydraError, OutputError
from hydracc.kernels.kinds import GDN, HEAD_KINDS, STREAMING, kind_by_code
from hydracc.kernels.kinds.gdn import GDN_CHUNK
from hydracc.paths import TEMP_NAME_EXTRA, check_name_length
from hydracc.runtime.cache import HybridCache, HybridLayer
from hydracc.runtime.hydra_config import read_hydra_layers

EXPORT_ATTENTION = "hydracc_export"
PROTOBUF_LIMIT = 2 * 1024**3


class ExportError(HydraError):
    """The ONNX export failed or does not match the torch model."""


def _export_attention(module: nn.Module, query: torch.Tensor, key: Any, value: Any, attention_mask: Any,
                      scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from hydracc.runtime.cache import HybridStep

    if not isinstance(key, HybridStep):
        raise ExportError("the export attention needs a HybridCache")
    entry = module._hydracc_layer
    params = module.hydra.op_params() if entry.params else []
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return key.attend(query, entry.codes, float(scale), params, entry.head_windows).transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(EXPORT_ATTENTION, _export_attention)
    AttentionMaskInterface.register(EXPORT_ATTENTION, _no_mask)


@dataclass
class LayerCache:
    """Which cache tensors one layer has, and their shapes without batch and length."""

    layer: int
    kinds: list[int]
    cached_kv: int
    linear_heads: int
    head_dim: int
    tensors: list[str] = field(default_factory=list)
    """``HybridLayer.cache_names()``: the layer's cache tensors in order."""
    head_windows: list[int] = field(default_factory=list)

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{self.layer}.{name}" for name in self.tensors]


@dataclass
class CacheLayout:
    layers: list[LayerCache] = field(default_factory=list)

    def names(self, prefix: str) -> list[str]:
        return [n for lc in self.layers for n in lc.names(prefix)]


def cache_layout(model: nn.Module) -> CacheLayout:
    """Per layer: kinds and cache tensor sizes, from the ``hydra`` section (attention modules by path)."""
    config = model.config.to_dict()
    layers = read_hydra_layers(config, "model config")
    entries = {int(e["layer"]): e for e in config["hydra"]["layers"]}
    layout = CacheLayout()
    for index in sorted(layers):
        hl, entry = layers[index], entries[index]
        unsupported = sorted({kind_by_code(c).name for c in hl.codes} - EXPORTABLE_KINDS)
        if unsupported:
            raise ExportError(
                f"layer {index} has {', '.join(unsupported)} heads, which the ONNX export does not support yet",
                hint=f"the ONNX export handles {', '.join(sorted(EXPORTABLE_KINDS))} heads; run this model with hydracc.load",
            )
        module = model.get_submodule(entry["module"])
        probe = HybridLayer()
        probe.configure(hl.codes, int(entry["num_heads"]), int(entry["num_kv_heads"]), hl.head_windows)
        module._hydracc_layer = hl
        layout.layers.append(LayerCache(index, hl.codes, len(probe.cached_kv), len(probe.linear_heads), int(entry["head_dim"]),
                                        probe.cache_names(), hl.head_windows))
    return layout


EXPORTABLE_KINDS = {kind.name for kind in HEAD_KINDS}


class _Step(nn.Module):
    """``(input_ids, position_ids, *past) -> (logits, *present)`` over a HybridCache."""

    def __init__(self, model: nn.Module, layout: CacheLayout, with_past: bool) -> None:
        super().__init__()
        self.model = model
        self.layout = layout
        self.with_past = with_past
        self.kv_heads = int(getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads)
        from hydracc.runtime.loader import cache_argument

        self.cache_name = cache_argument(model)  # (past_key_values before transformers 5.25)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = HybridCache(num_layers=len(self.layout.layers))
        it = iter(past)
        for lc, layer in zip(self.layout.layers, cache.layers):
            assert isinstance(layer, HybridLayer)
            layer.is_initialized = True
            layer.configure(lc.kinds, len(lc.kinds), self.kv_heads, lc.head_windows)
            layer.first_position = position_ids[0, 0]  # streaming rings are written by position
            if self.with_past:
                layer.set_cache_tensors([next(it) for _ in lc.tensors])
        out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=True, **{self.cache_name: cache})
        present: list[torch.Tensor] = []
        for layer in cache.layers:
            assert isinstance(layer, HybridLayer)
            present += layer.cache_tensors()
        return (out.logits, *present)


@dataclass
class ExportReport:
    path: Path
    files: list[str]
    prefill_max_diff: float
    decode_max_diff: float
    decoded_tokens: int
    atol: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "files": self.files, "prefill_max_abs_diff": self.prefill_max_diff,
            "decode_max_abs_diff": self.decode_max_diff, "decoded_tokens": self.decoded_tokens, "atol": self.atol,
            "seconds": round(self.seconds, 2),
        }


DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""Weight and activation dtypes the export offers: onnxruntime's CPU kernels run both (linear
heads' states stay fp32 either way)."""
DEFAULT_ATOL = {"float32": 1e-4, "float16": 2e-2}
"""The check's bound per dtype. float32: the largest |onnxruntime - torch| over every output.
float16: that difference divided by the output's largest magnitude, since fp16 rounding scales
with it (the differences seen on the example model are in ``benchmarks/README.md``)."""


def _load_for_export(checkpoint: Path, dtype: str = "float32", allow_nonfinite: bool = False,
                     check_hashes: bool = True) -> tuple[nn.Module, CacheLayout]:
    from hydracc.runtime.loader import load

    _register()
    model = load(checkpoint, dtype=DTYPES[dtype], allow_nonfinite=allow_nonfinite, check_hashes=check_hashes)
    layout = cache_layout(model)
    model.set_attn_implementation(EXPORT_ATTENTION)
    return model, layout


def _dims(layout: CacheLayout, with_past: bool) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    if not with_past:
        seq = torch.export.Dim("sequence", min=2, max=1 << 20)
        return ({0: batch, 1: seq}, {0: batch, 1: seq})
    past = torch.export.Dim("past", min=1, max=1 << 20)
    shapes: list[dict] = []
    for lc in layout.layers:
        for name in lc.tensors:
            # keys/values grow with the past; states and streaming rings have fixed sizes (the ring's
            # positions have no batch dim)
            shapes.append({0: batch, 2: past} if name in ("keys", "values") else None if name == "window.positions" else {0: batch})
    return ({0: batch}, {0: batch}, tuple(shapes))


def _export_one(module: _Step, args: tuple, layout: CacheLayout, path: Path, external: bool) -> None:
    import logging
    import warnings

    names_in = ["input_ids", "position_ids"] + (layout.names("past") if module.with_past else [])
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notes are not for our users
    with warnings.catch_warnings(), _restore_level(quiet, level):
        warnings.simplefilter("ignore")
        try:  # under no_grad: an autograd-wrapped scan (gdn's chunk loop) does not export
            with torch.no_grad():
                program = torch.onnx.export(
                    module, args, dynamo=True, dynamic_shapes=_dims(layout, module.with_past), input_names=names_in,
                    output_names=["logits"] + layout.names("present"), verbose=False,
                )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {path.name}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
        program.save(path, external_data=external)


class _restore_level:
    def __init__(self, logger: Any, level: int) -> None:
        self.logger, self.level = logger, level

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


def _max_diff(got: np.ndarray, want: torch.Tensor, relative: bool) -> float:
    ref = want.double().numpy()
    diff = float(np.abs(got.astype(np.float64) - ref).max()) if ref.size else 0.0
    return diff / max(float(np.abs(ref).max()), 1e-6) if relative and ref.size else diff


def check_length(layout: CacheLayout) -> int:
    """The check's prompt length: long enough that gdn heads span two chunks and streaming rings wrap."""
    length = 11
    for lc in layout.layers:
        if GDN.code in lc.kinds:
            length = max(length, GDN_CHUNK + 7)
        stream = [h for h, c in enumerate(lc.kinds) if c == STREAMING.code]
        if stream:
            ring = max(lc.head_windows[2 * h] for h in stream) + max(lc.head_windows[2 * h + 1] for h in stream)
            length = max(length, ring + 3)
    return length


def check_onnx(
    onnx_dir: Path, checkpoint: Path, *, atol: float = 1e-4, tokens: int = 8, seed: int = 0,
    loaded: tuple[nn.Module, CacheLayout] | None = None, dtype: str = "float32",
) -> tuple[float, float, int]:
    """Run both graphs with onnxruntime on fresh random inputs against hydracc's own model.

    Prefill: a random batch (3 rows) against the torch export wrapper, every output. Decode:
    ``tokens`` greedy steps through the decode graph (feeding its cache outputs back) against
    hydracc's runtime decoding with a ``HybridCache``; logits are compared at every step and the
    chosen tokens must agree. Returns the largest differences (relative to each output's largest
    magnitude for float16, see ``DEFAULT_ATOL``) and the tokens decoded; raises ``ExportError``
    above ``atol``.
    """
    import onnxruntime as ort

    model, layout = loaded if loaded is not None else _load_for_export(checkpoint, dtype)
    model.set_attn_implementation(EXPORT_ATTENTION)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    batch, length = 3, check_length(layout)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    pos = torch.arange(length).expand(batch, length).contiguous()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        prefill = ort.InferenceSession(str(onnx_dir / "prefill.onnx"), opts, providers=["CPUExecutionProvider"])
        decode = ort.InferenceSession(str(onnx_dir / "decode.onnx"), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported graphs in {onnx_dir}: {exc}") from exc
    with torch.no_grad():
        expected = _Step(model, layout, with_past=False)(ids, pos)
    got = prefill.run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy()})
    relative = dtype == "float16"
    prefill_diff = max(_max_diff(g, e, relative) for g, e in zip(got, expected))
    if not prefill_diff <= atol:
        raise ExportError(f"prefill graph differs from the torch model by {prefill_diff:.3g} (--atol {atol:g})")
    # decode: onnxruntime's own cache against hydracc's runtime with a HybridCache
    from hydracc.runtime.loader import ATTN_IMPLEMENTATION, cache_argument

    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    cache = HybridCache(model.config)
    with torch.no_grad():
        named = {cache_argument(model): cache}  # (past_key_values before transformers 5.25)
        ref_logits = model(ids, use_cache=True, **named).logits
    past = got[1:]
    ort_next = got[0][:, -1].argmax(-1)
    ref_next = ref_logits[:, -1].argmax(-1)
    decode_diff = 0.0
    names = layout.names("past")
    for step in range(tokens):
        if not np.array_equal(ort_next, ref_next.numpy()):
            raise ExportError(f"decode step {step}: onnxruntime chose tokens {ort_next.tolist()}, hydracc {ref_next.tolist()}")
        position = np.full((batch, 1), length + step, dtype=np.int64)
        feeds = {"input_ids": ort_next[:, None].astype(np.int64), "position_ids": position, **dict(zip(names, past))}
        out = decode.run(None, feeds)
        with torch.no_grad():
            ref = model(ref_next[:, None], use_cache=True, **named).logits
        decode_diff = max(decode_diff, _max_diff(out[0], ref, relative))
        if not decode_diff <= atol:
            raise ExportError(f"decode graph differs from hydracc's decode by {decode_diff:.3g} at step {step} (--atol {atol:g})")
        past = out[1:]
        ort_next, ref_next = out[0][:, -1].argmax(-1), ref[:, -1].argmax(-1)
    return prefill_diff, decode_diff, tokens


def export_onnx(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, atol: float | None = None,
    check_tokens: int = 8, force: bool = False, dtype: str = "float32", allow_nonfinite: bool = False,
    check_hashes: bool = True,
) -> ExportReport:
    """Export ``checkpoint`` (a converted folder) to ``out`` (default ``checkpoint/onnx``) and check it.

    ``dtype``: ``"float32"`` or ``"float16"`` weights and activations; ``atol`` defaults to
    ``DEFAULT_ATOL[dtype]``. Writes ``prefill.onnx``, ``decode.onnx`` and ``export.json`` into a
    temporary folder next to ``out``; renames it into place only when the onnxruntime check passed.
    """
    import json
    import time

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise ExportError(f"unknown ONNX dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
    atol = DEFAULT_ATOL[dtype] if atol is None else atol
    src = Path(checkpoint)
    check_name_length(src, "checkpoint path", error=CheckpointError)  # before any path is looked at
    if out is not None:
        check_name_length(out, "output", extra=TEMP_NAME_EXTRA)
    if not src.exists():
        raise CheckpointError(f"checkpoint path {src} does not exist", hint="give the folder of a converted checkpoint (hydracc convert -o)")
    if src.is_file():
        src = src.parent
    dest = Path(out) if out is not None else src / "onnx"
    if dest.resolve() == src.resolve() or src.resolve().is_relative_to(dest.resolve()):
        raise OutputError(f"output {dest} would replace the checkpoint {src}", hint="write the ONNX files to a new folder (default: CHECKPOINT/onnx)")
    dest = dest.expanduser().absolute()
    check_destination(dest, force)  # before any work: a file, someone else's folder, cwd/home/root
    model, layout = _load_for_export(src, dtype, allow_nonfinite, check_hashes)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT // 2
    tmp = make_temp_folder(dest)
    try:
        batch, length = 2, 8
        ids = torch.zeros(batch, length, dtype=torch.long)
        pos = torch.arange(length).expand(batch, length).contiguous()
        prefill = _Step(model, layout, with_past=False).eval()
        _export_one(prefill, (ids, pos), layout, tmp / "prefill.onnx", external)
        with torch.no_grad():
            past = prefill(ids, pos)[1:]
        decode = _Step(model, layout, with_past=True).eval()
        step_args = (ids[:, :1], torch.full((batch, 1), length), *past)
        _export_one(decode, step_args, layout, tmp / "decode.onnx", external)
        prefill_diff, decode_diff, n = check_onnx(tmp, src, atol=atol, tokens=check_tokens, loaded=(model, layout), dtype=dtype)
        meta = {
            "format": "hydracc-onnx", "version": 1, "dtype": dtype,
            "inputs": {"prefill": ["input_ids", "position_ids"], "decode": ["input_ids", "position_ids"] + layout.names("past")},
            "outputs": ["logits"] + layout.names("present"),
            "layers": [{"layer": lc.layer, "cached_kv_heads": lc.cached_kv, "linear_heads": lc.linear_heads,
                        "head_dim": lc.head_dim} for lc in layout.layers],
            "check": {"prefill_max_abs_diff": prefill_diff, "decode_max_abs_diff": decode_diff, "decoded_tokens": n, "atol": atol,
                      "bound": "relative to the largest magnitude" if dtype == "float16" else "absolute"},
        }
        (tmp / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / OWNER_MARKER).unlink()
        swap_into_place(tmp, dest, force=force)
    except OSError as exc:  # a full disk or a vanished folder while writing: bad output location, not a bug
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write the ONNX export for {dest}: {exc.strerror or exc}",
                          hint="check the free space and permissions of the output folder's parent") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in dest.iterdir())
    return ExportReport(dest, files, prefill_diff, decode_diff, n, atol, time.perf_counter() - start)
