"""The conversion stages: load -> capture -> analyze -> plan -> [distill] -> rewrite -> emit, as Python functions.

Design decisions:
- Each stage is a function taking the previous stage's output; ``hydracc.pipeline.run``
  chains them into the one conversion (``run_conversion``), and Python users can call them
  one by one and stop after any of them. No stage reaches back into an earlier one.
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
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hydracc
from hydracc.analysis.calibration import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    Calibration,
    check_calibration_size,
    default_calibration,
    load_calibration,
)
from hydracc.analysis.layerwise import compute_dtype
from hydracc.analysis.scores import EXACT_K, Analysis, analyze
from hydracc.device import default_device
from hydracc.distill.train import DistillResult, DistillSettings, distill, initial_values, state_dir_for
from hydracc.emit.hydra_section import hydra_section
from hydracc.emit.writer import DEFAULT_MAX_SHARD_BYTES, SIDE_FILES, CheckpointWriter
from hydracc.errors import HydraError, OutputError, PassError, PlanError
from hydracc.frontend.capture import CapturedModel, capture, require_sites
from hydracc.frontend.checkpoint import Checkpoint, open_checkpoint
from hydracc.frontend.model import build_model, check_runtime_support, expected_weights, match_weights
from hydracc.passes import PassContext, PassManager, pipeline
from hydracc.passes.hybridize import HYBRID_OP
from hydracc.planning.budget import Budget, make_budget_plan
from hydracc.planning.plan import CacheCost, Plan, cache_cost, check_plan_fits, load_plan, with_counted_budget  # noqa: F401 (cache_cost: old name)
from hydracc.runtime.integrity import DIGESTS_KEY


@dataclass
class Inspection:
    """A checkpoint opened, checked against its config and captured (no tensor data read)."""

    checkpoint: Checkpoint
    captured: CapturedModel
    weight_names: dict[str, str]
    """Model weight name -> checkpoint tensor name (see ``model.match_weights``)."""
    tied: dict[str, str] = field(default_factory=dict)
    """Model weight name -> the weight it shares storage with (``lm_head.weight`` -> embeddings)."""
    dtype: torch.dtype | None = None
    """The floating dtype the graph was captured in (``None``: the checkpoint's); weights are read in it."""

    @property
    def dropped(self) -> list[str]:
        """Checkpoint tensors the converted checkpoint leaves out (transformers ignores them too)."""
        kept = set(self.weight_names.values())
        return [name for name in self.checkpoint.names() if name not in kept]

    def read_weight(self, name: str) -> torch.Tensor:
        """One weight the model needs, by its model name, read from the checkpoint now in the
        checkpoint's dtype (tied weights read their source); what the layer-by-layer analysis
        reads as each layer runs (it casts to the graph's dtype itself)."""
        if name in self.weight_names:
            return self.checkpoint.get(self.weight_names[name])
        if name in self.tied and self.tied[name] in self.weight_names:
            return self.checkpoint.get(self.weight_names[self.tied[name]])
        raise KeyError(f"the checkpoint has no weight for {name}")

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def load_weights(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every weight the model needs, read into memory under the model's names."""
        weights = {name: self._cast(self.checkpoint.get(ck_name)).to(device) for name, ck_name in self.weight_names.items()}
        for name, source in self.tied.items():
            if name not in weights and source in weights:
                weights[name] = weights[source]
        return weights

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
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per pass, what it changed (``PassManager.counts``: e.g. sites rewritten); empty if not recorded."""


@dataclass
class ConversionResult:
    inspection: Inspection
    plan: Plan
    cost: CacheCost
    rewrite: Rewrite | None = None
    output: Path | None = None
    files: list[Path] = field(default_factory=list)
    analysis: Analysis | None = None
    learned: DistillResult | None = None
    onnx: Any = None
    """The ONNX export's report (``hydracc.export.onnx.ExportReport``) when ``onnx=True``."""
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        """The JSON report ``hydracc convert --json`` prints (``status``, sites, plan, KV cache, ...)."""
        insp = self.inspection
        cost = self.cost
        report: dict[str, Any] = {
            "status": "ok",
            "hydracc_version": hydracc.__version__,
            "mode": "plan" if self.dry_run else "convert",
            "input": str(insp.checkpoint.root),
            "model_type": insp.captured.config.model_type,
            "dropped_tensors": insp.dropped,
            "sites": [
                {
                    "layer": s.layer, "module": s.module, "num_heads": s.num_heads, "num_kv_heads": s.num_kv_heads,
                    "head_dim": s.head_dim, "scale": s.scale, "causal": s.causal, "permutable": s.permutable,
                }
                for s in insp.captured.sites
            ],
            "plan": self.plan.to_json(),
            "analysis": self.analysis.to_json() if self.analysis is not None else None,
            "kv_cache": {
                "element_bytes": insp.element_bytes,
                "bytes_per_token_before": cost.kv_bytes_per_token_before,
                "bytes_per_token_after": cost.kv_bytes_per_token_after,
                "ratio": round(cost.ratio, 6),
                "linear_state_bytes_per_sequence": cost.linear_state_bytes,
            },
        }
        if self.rewrite is not None:
            report["passes"] = self.rewrite.passes
            report["pass_counts"] = self.rewrite.counts
            report["notes"] = self.rewrite.context.notes
        if self.learned is not None:
            report["distill"] = self.learned.record()
        if self.output is not None:
            report["output"] = {"path": str(self.output), "files": [p.name for p in self.files]}
        if self.onnx is not None:
            report["onnx"] = self.onnx.to_json()
        return report


def inspect_checkpoint(path: str | os.PathLike[str], *, capture_shape: tuple[int, int] = (2, 16),
                       calibration: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> Inspection:
    """Load stage + capture stage: open, validate against the config, capture, find sites.

    ``capture_shape`` is the ``[batch, seq_len]`` the graph is exported at; analysis runs
    calibration batches of exactly that shape through it. ``calibration=(samples, seq_len)``
    picks it instead (``calibration_shape``, with the model's vocabulary). ``dtype``: the
    floating dtype the graph computes in (default: the checkpoint's; the conversion passes
    float32 when it computes on the CPU).
    """
    ck = open_checkpoint(path)
    if calibration is not None:
        vocab = ck.config.get("vocab_size")
        try:
            capture_shape = calibration_shape(*calibration, vocab_size=vocab if isinstance(vocab, int) and vocab > 0 else None)
        except BaseException:
            ck.close()
            raise
    limit = ck.config.get("max_position_embeddings") or ck.config.get("n_positions")
    if isinstance(limit, int) and capture_shape[1] > limit:
        ck.close()
        raise HydraError(
            f"--seq-len {capture_shape[1]} is longer than the model's {limit} positions",
            hint=f"use --seq-len {limit} or less",
        )
    try:
        model = build_model(ck.config, dtype=dtype)
        names = match_weights(model, ck)
        captured = capture(model, batch=capture_shape[0], seq_len=capture_shape[1])
        require_sites(captured)
        check_runtime_support(ck.config, captured.sites)
    except BaseException:
        ck.close()
        raise
    return Inspection(ck, captured, names, expected_weights(model)[1], dtype)


CALIBRATION_BATCH = 8
"""Most calibration rows per graph run (the batch the graph is captured at when analyzing)."""
LOGITS_BYTES = 128 * 2**20
"""Largest fp32 logits tensor of one graph run: rows per batch shrink for large vocabularies."""


def calibration_shape(samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, vocab_size: int | None = None) -> tuple[int, int]:
    """The ``capture_shape`` to inspect a checkpoint at so that it can be analyzed: up to
    ``CALIBRATION_BATCH`` rows, fewer when their logits would pass ``LOGITS_BYTES``."""
    if samples < 1 or seq_len < 2:
        raise HydraError(f"calibration needs --calib-samples >= 1 and --seq-len >= 2, got {samples} and {seq_len}")
    rows = CALIBRATION_BATCH
    if vocab_size:
        rows = max(1, min(rows, LOGITS_BYTES // (seq_len * int(vocab_size) * 4)))
    return (min(samples, rows), seq_len)


def calibration_for(
    inspection: Inspection,
    calib: str | os.PathLike[str] | None = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> Calibration:
    """Calibration rows for this model: read from ``calib`` or the built-in default."""
    vocab = int(inspection.checkpoint.config.get("vocab_size") or inspection.captured.config.vocab_size)
    cfg = inspection.captured.config
    holds = {"hidden": getattr(cfg, "hidden_size", None), "layers": getattr(cfg, "num_hidden_layers", None),
             "element_bytes": inspection.dtype.itemsize if inspection.dtype is not None else inspection.element_bytes}
    if calib is not None:
        loaded = load_calibration(calib, vocab_size=vocab, samples=samples, seq_len=seq_len,
                                  checkpoint_root=inspection.checkpoint.root)
        check_calibration_size(loaded.samples, loaded.seq_len, **holds)  # a file's rows are known once read
        return loaded
    check_calibration_size(samples, seq_len, **holds)  # before the rows are made
    from hydracc.evaluation.probes import token_space

    return default_calibration(vocab_size=vocab, samples=samples, seq_len=seq_len,
                               space=token_space(Path(inspection.checkpoint.root), vocab))


def analyze_heads(
    inspection: Inspection,
    calibration: Calibration,
    *,
    linear_kind: str = "elu",
    kind_params: dict[str, int] | None = None,
    fusion: bool = False,
    method: str = "auto",
    objective: str = "recall",
    cut: int | None = None,
    exact_k: int = EXACT_K,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Analyze stage: score every head on ``calibration``, one layer at a time (weights are read
    from the checkpoint as their layer runs). ``device``: default CUDA when available, else CPU."""
    if inspection.captured.input_shape[1] != calibration.seq_len:
        raise HydraError(
            f"the graph was captured for length {inspection.captured.input_shape[1]} but calibration rows have "
            f"{calibration.seq_len} tokens; inspect with capture_shape=calibration_shape(...)"
        )
    dev = torch.device(device) if device is not None else default_device()
    dtypes = [d for d in inspection.checkpoint.dtypes() if d.is_floating_point]
    dtype = inspection.dtype or compute_dtype(torch.device("cuda"), dtypes)  # the graph's: it asserts its dtypes
    return analyze(inspection.captured, inspection.read_weight, calibration, linear_kind=linear_kind,
                   kind_params=kind_params, fusion=fusion, method=method, objective=objective, cut=cut,
                   exact_k=exact_k, device=dev,
                   dtype=dtype, progress=progress)


def capture_dtype(device: str | torch.device | None) -> torch.dtype | None:
    """The dtype to capture in for computing on ``device``: float32 on the CPU (where bf16/fp16
    arithmetic is slow and coarse), else the checkpoint's own (``None``)."""
    dev = torch.device(device) if device is not None else default_device()
    return torch.float32 if dev.type == "cpu" else None


def budget_cut(inspection: Inspection, budget: Budget) -> int:
    """About how many units ``budget`` keeps full: where the analysis re-measures exactly."""
    from hydracc.analysis.scores import units_of

    total = sum(len(units_of(s)) for s in inspection.captured.sites)
    fraction = budget.full_ratio if budget.full_ratio is not None else budget.kv_budget
    return round(float(fraction or 0.0) * total)


def make_plan(
    inspection: Inspection,
    *,
    plan_file: str | os.PathLike[str] | None = None,
    budget: Budget | None = None,
    strategy: str = "heads",
    analysis: Analysis | None = None,
    score: str = "sensitivity",
    keep_full: Sequence[str] = (),
    force_linear: Sequence[str] = (),
    linear_kind: str = "elu",
    seed: int = 0,
    kind_params: dict[str, int] | None = None,
    fusion: bool | None = None,
    other_model: bool = False,
) -> Plan:
    """Plan stage: read ``plan_file``, or allocate ``budget`` (default: 25% of units) by ``strategy``.

    ``fusion``: ``True``/``False`` sets scale-normalized fusion (overriding a plan file's
    choice; layers with learned kinds keep theirs), ``None`` keeps the plan file's or is off.
    A plan file's budget record is recomputed from its heads (``with_counted_budget``); a plan made
    for another ``model_type`` is refused unless ``other_model``.
    """
    sites = inspection.captured.sites
    if plan_file is not None:
        plan = load_plan(plan_file)
        made_for, model_type = plan.model.get("model_type"), inspection.captured.config.model_type
        if made_for is not None and made_for != model_type and not other_model:
            raise PlanError(f"plan file {plan_file} was made for a {str(made_for)[:60]!r} model, but this checkpoint is "
                            f"{model_type!r} (the shapes match, so it would apply, likely to the wrong heads)",
                            hint="plan this model with --plan --plan-out, or pass --force to use the plan anyway")
        with_counted_budget(plan, sites, inspection.element_bytes)
        if fusion is not None:
            plan.fusion = fusion
    else:
        plan = make_budget_plan(
            sites, inspection.captured.config.model_type, budget or Budget(full_ratio=0.25),
            strategy=strategy, analysis=analysis, score=score, keep_full=keep_full, force_linear=force_linear,
            linear_kind=linear_kind, seed=seed, element_bytes=inspection.element_bytes, kind_params=kind_params,
            fusion=bool(fusion),
        )
    limit = inspection.checkpoint.config.get("max_position_embeddings") or inspection.checkpoint.config.get("n_positions")
    check_plan_fits(plan, sites, limit if isinstance(limit, int) and not isinstance(limit, bool) else None)
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
    counts = getattr(manager, "counts", None) or {}
    return Rewrite(ctx, manager.ran, {name: dict(c) for name, c in counts.items()})


def needs_learned_params(plan: Plan) -> bool:
    """Whether converting by ``plan`` adds learned parameters (fusion scales, feature maps, gates)."""
    return any(plan.layer_has_params(lp) for lp in plan.layers)


def learn_params(
    inspection: Inspection,
    plan: Plan,
    calibration: Calibration,
    *,
    settings: DistillSettings | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Callable[[str, int, int, float], None] | None = None,
    device: str | torch.device | None = None,
) -> DistillResult | None:
    """Distill stage: values for the parameters ``plan`` adds (``None`` if it adds none).

    Runs on the captured graph *before* ``rewrite`` (it needs the original attention), so call
    it first; its values are keyed by the checkpoint names the rewrite records. Without
    ``settings`` the parameters keep their measured initial values (no training). With ``out``,
    training state is saved beside it (``OUT.hydracc-distill``) for ``resume``. The graph must
    have been captured at the calibration shape. Weights are read one layer at a time; the
    measured initial values are computed on ``device`` (training: on ``settings.device``).
    """
    if not needs_learned_params(plan):
        if settings is not None:
            raise HydraError("--distill: this plan adds no parameters to train (no linear heads)")
        return None
    if inspection.captured.input_shape[1] != calibration.seq_len:
        raise HydraError(
            f"the graph was captured for length {inspection.captured.input_shape[1]} but calibration rows have "
            f"{calibration.seq_len} tokens; inspect with capture_shape=calibration_shape(...)"
        )
    if any(n.target is HYBRID_OP for n in inspection.captured.graph_module.graph.nodes):
        raise HydraError("learn_params needs the original graph: call it before rewrite")
    dtypes = [d for d in inspection.checkpoint.dtypes() if d.is_floating_point]
    dtype = inspection.dtype or compute_dtype(torch.device("cuda"), dtypes)  # the graph's: it asserts its dtypes
    if settings is None:
        device = default_device() if device is None else torch.device(device)
        return DistillResult(initial_values(inspection.captured, inspection.read_weight, plan, calibration,
                                            device=device, dtype=dtype), None)
    fingerprint = json.dumps(inspection.checkpoint.sha256(), sort_keys=True)
    return distill(
        inspection.captured, inspection.read_weight, plan, calibration, settings,
        state_dir=state_dir_for(out) if out is not None else None, fingerprint=fingerprint, resume=resume,
        progress=progress, dtype=dtype,
    )


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
    learned: DistillResult | None = None,
    base_model: str | None = None,
) -> list[Path]:
    """Emit stage: write the converted checkpoint to ``out`` atomically; return its files.

    ``learned`` gives the values of the parameters the rewrite added (required when it added any).
    The folder gets a model card (``README.md``; ``base_model`` for its front matter, else the
    input card's), with the input's card kept below it.
    """
    added = result.context.added_params
    if added and (learned is None or set(added) - set(learned.values)):
        raise HydraError("this rewrite added learned parameters; pass their values (learn_params) to emit")
    ck = inspection.checkpoint
    out_path, src = Path(out).resolve(), ck.root.resolve()
    if out_path == src or src.is_relative_to(out_path):
        raise OutputError(
            f"output {out} would replace the input checkpoint {ck.root}",
            hint="write the converted checkpoint to a new folder",
        )
    config = dict(ck.config)
    config["attn_implementation"] = "hydracc"  # Auto loading after `import hydracc` builds the hybrid
    config["hydra"] = hydra_section(result.context, result.passes, provenance(inspection))
    if learned is not None and added:
        config["hydra"]["distill"] = learned.record()
    edits = result.context.weight_edits
    with CheckpointWriter(out, force=force, max_shard_bytes=max_shard_bytes) as writer:
        for name, ck_name in sorted(inspection.weight_names.items()):
            tensor = edits.apply(name, ck.get(ck_name))
            writer.add(name, tensor)
            if on_tensor is not None:
                on_tensor(name, tensor.numel() * tensor.element_size())
            del tensor
        for name in sorted(added):
            assert learned is not None
            tensor = edits.apply(name, learned.values[name].detach().float().contiguous())
            writer.add(name, tensor)
            if on_tensor is not None:
                on_tensor(name, tensor.numel() * tensor.element_size())
        config["hydra"][DIGESTS_KEY] = dict(sorted(writer.digests.items()))  # checked by load and verify
        writer.write_json("config.json", config)
        for side in SIDE_FILES:
            if (ck.root / side).is_file():
                writer.copy_file(ck.root / side, side)
        writer.write_text("README.md", _model_card(inspection, result, config, base_model))
    return writer.written_files()


def _model_card(inspection: Inspection, result: Rewrite, config: dict[str, Any], base_model: str | None) -> str:
    from hydracc.emit.model_card import build_model_card

    plan = result.context.plan
    assert plan is not None
    cost = cache_cost(plan, inspection.captured.sites, inspection.element_bytes)
    card = inspection.checkpoint.root / "README.md"
    try:
        input_card = card.read_text(encoding="utf-8") if card.is_file() else None
    except (OSError, UnicodeDecodeError):
        input_card = None  # an unreadable card is not worth failing a conversion for; ours stands alone
    return build_model_card(config, kv_bytes_per_token_before=cost.kv_bytes_per_token_before,
                            kv_bytes_per_token_after=cost.kv_bytes_per_token_after,
                            state_bytes_per_sequence=cost.linear_state_bytes, input_card=input_card, base_model=base_model)
