"""The conversion pipeline: load -> capture -> plan -> rewrite -> emit, as Python functions.

Design decisions:
- Each stage is a function taking the previous stage's output, so the CLI and Python
  users call the same steps and can stop after any of them (``--plan`` stops after
  planning). No stage reaches back into an earlier one.
- Everything that can be checked without reading tensor data is checked first (config,
  headers against the model built on meta tensors, attention sites, plan fit), so a bad
  input fails in seconds and before the output path is touched.
- Emit streams: each tensor is read from the input, edited (head reorders recorded by
  passes), written into the current shard, and dropped; the writer renames its
  temporary folder into place only when everything succeeded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hydracc
from hydracc.capture import CapturedModel, capture, require_sites
from hydracc.checkpoint import Checkpoint, open_checkpoint
from hydracc.converted import hydra_section
from hydracc.emit import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter
from hydracc.errors import HydraError, OutputError, PassError
from hydracc.model import build_model, match_weights
from hydracc.passes import PassContext, PassManager, pipeline
from hydracc.plan import (
    CacheCost,
    Plan,
    cache_cost,
    check_plan_fits,
    load_plan,
    ratio_plan,
)
from hydracc.runtime import check_runtime_support

SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files copied verbatim from the input folder when present (tokenizer and generation settings)."""


@dataclass
class Inspection:
    """A checkpoint opened, checked against its config and captured (no tensor data read)."""

    checkpoint: Checkpoint
    captured: CapturedModel
    weight_names: dict[str, str]
    """Model weight name -> checkpoint tensor name (see ``model.match_weights``)."""

    @property
    def dropped(self) -> list[str]:
        """Checkpoint tensors the converted checkpoint leaves out (transformers ignores them too)."""
        kept = set(self.weight_names.values())
        return [name for name in self.checkpoint.names() if name not in kept]

    @property
    def element_bytes(self) -> int:
        """Bytes per element of the KV cache: the widest floating dtype of the weights."""
        sizes = [torch.empty((), dtype=d).element_size() for d in self.checkpoint.dtypes() if d.is_floating_point]
        return max(sizes) if sizes else 4


@dataclass
class Rewrite:
    """The result of running the passes."""

    context: PassContext
    passes: list[str]


@dataclass
class ConversionResult:
    inspection: Inspection
    plan: Plan
    cost: CacheCost
    rewrite: Rewrite | None = None
    output: Path | None = None
    files: list[Path] = field(default_factory=list)


def inspect_checkpoint(path: str | os.PathLike[str]) -> Inspection:
    """Load stage + capture stage: open, validate against the config, capture, find sites."""
    ck = open_checkpoint(path)
    model = build_model(ck.config)
    names = match_weights(model, ck)
    captured = capture(model)
    require_sites(captured)
    check_runtime_support(ck.config, captured.sites)
    return Inspection(ck, captured, names)


def make_plan(
    inspection: Inspection,
    *,
    plan_file: str | os.PathLike[str] | None = None,
    full_ratio: float = 0.25,
    linear_kind: str = "elu",
) -> Plan:
    """Plan stage: read ``plan_file`` or build the simple ratio plan; check it fits the model."""
    sites = inspection.captured.sites
    if plan_file is not None:
        plan = load_plan(plan_file)
    else:
        plan = ratio_plan(sites, inspection.captured.config.model_type, full_ratio=full_ratio, linear_kind=linear_kind)
    check_plan_fits(plan, sites)
    return plan


def load_plugins(plugins: Sequence[str]) -> None:
    """Import user pass modules (a ``.py`` file path or a module name) so their passes register.

    This runs the user's own code, named on the command line; nothing from a checkpoint is run.
    """
    for spec in plugins:
        try:
            if spec.endswith(".py") or os.sep in spec:
                p = Path(spec)
                if not p.is_file():
                    raise PassError(f"plugin file {p} does not exist")
                name = f"hydracc_plugin_{p.stem}"
                module_spec = importlib.util.spec_from_file_location(name, p)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except HydraError:
            raise
        except Exception as exc:
            raise PassError(f"could not load plugin {spec!r}: {type(exc).__name__}: {exc}") from exc


def rewrite(
    inspection: Inspection,
    plan: Plan,
    *,
    user_passes: Sequence[str | Callable[[PassContext], None]] = (),
    permute: bool = True,
) -> Rewrite:
    """Rewrite stage: run the pass pipeline over the captured graph."""
    ctx = PassContext(inspection.captured, plan)
    manager = PassManager(pipeline(user_passes, permute=permute))
    manager.run(ctx)
    return Rewrite(ctx, manager.ran)


def provenance(inspection: Inspection) -> dict[str, Any]:
    import transformers

    return {
        "hydracc_version": hydracc.__version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "inputs": inspection.checkpoint.sha256(),
    }


def emit(
    inspection: Inspection,
    result: Rewrite,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_tensor: Callable[[str, int], None] | None = None,
) -> list[Path]:
    """Emit stage: write the converted checkpoint to ``out`` atomically; return its files."""
    ck = inspection.checkpoint
    out_path, src = Path(out).resolve(), ck.root.resolve()
    if out_path == src or src.is_relative_to(out_path):
        raise OutputError(
            f"output {out} would replace the input checkpoint {ck.root}",
            hint="write the converted checkpoint to a new folder",
        )
    config = dict(ck.config)
    config["hydra"] = hydra_section(result.context, result.passes, provenance(inspection))
    edits = result.context.weight_edits
    with CheckpointWriter(out, force=force, max_shard_bytes=max_shard_bytes) as writer:
        for name, ck_name in sorted(inspection.weight_names.items()):
            tensor = edits.apply(name, ck.get(ck_name))
            writer.add(name, tensor)
            if on_tensor is not None:
                on_tensor(name, tensor.numel() * tensor.element_size())
            del tensor
        writer.write_json("config.json", config)
        for side in SIDE_FILES:
            if (ck.root / side).is_file():
                writer.copy_file(ck.root / side, side)
    return writer.written_files()


def convert(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    plan_file: str | os.PathLike[str] | None = None,
    full_ratio: float = 0.25,
    linear_kind: str = "elu",
    user_passes: Sequence[str | Callable[[PassContext], None]] = (),
    permute: bool = True,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> ConversionResult:
    """The whole conversion from Python: the same steps as ``hydracc convert PATH -o OUT``."""
    inspection = inspect_checkpoint(path)
    try:
        plan = make_plan(inspection, plan_file=plan_file, full_ratio=full_ratio, linear_kind=linear_kind)
        cost = cache_cost(plan, inspection.captured.sites, inspection.element_bytes)
        result = rewrite(inspection, plan, user_passes=user_passes, permute=permute)
        files = emit(inspection, result, out, force=force, max_shard_bytes=max_shard_bytes)
    finally:
        inspection.checkpoint.close()
    return ConversionResult(inspection, plan, cost, result, Path(out), files)
