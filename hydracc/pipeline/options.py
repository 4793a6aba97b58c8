"""Every conversion option, declared once: ``ConvertOptions``.

Design decisions:
- One frozen dataclass field per option. Its metadata (``_opt``) holds what the command line
  needs too: the flag spelling, help text, choices and range; ``hydracc.cli.convert`` builds
  its click options from these fields (one flag per field, one field per flag), so adding an
  option means adding one field here.
- Two levels of checks. ``__post_init__`` checks each value on its own (type, choice, range)
  and raises ``OptionError`` naming the Python keyword, so ``convert(..., kv_budget=2)`` fails
  before any work with a message a Python caller can act on. ``check()`` checks the options
  together (conflicting budgets, ``--resume`` without ``--distill``, ...) before any tensor is
  read; its messages name the flags (``style="cli"``) or the keywords (``style="python"``).
- Kind choices come from the kind table (``hydracc.kernels.kinds``), read lazily so that
  ``hydracc --help`` does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hydracc.errors import HydraError, OutputError

Style = Literal["python", "cli"]


class OptionError(HydraError):
    """A conversion option has a wrong type or value, or options conflict (exit code 2)."""


def linear_kind_choices() -> tuple[str, ...]:
    """What converted heads may become: every kind in the kind table but ``full``."""
    from hydracc.kernels.kinds import KIND_NAMES

    return tuple(k for k in KIND_NAMES if k != "full")


_MISSING = object()


def _opt(default: Any, help: str, *, flags: tuple[str, ...] = (), type: Any = str, optional: bool = False,
         choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None, min: float | None = None,
         max: float | None = None, min_open: bool = False, multiple: bool = False, metavar: str | None = None,
         show_default: bool = True, argument: bool = False, secondary: str | None = None) -> Any:
    """A ``ConvertOptions`` field with its command-line spelling in the metadata."""
    meta = {"help": help, "flags": flags, "type": type, "optional": optional, "choices": choices, "min": min,
            "max": max, "min_open": min_open, "multiple": multiple, "metavar": metavar, "show_default": show_default,
            "argument": argument, "secondary": secondary}
    if default is _MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


_PATH = Path
_PASSES = "passes"  # names or callables
_SIZE = "size"  # "5GB" or an int


DISTILL_KIND = "gdn"
"""``--distill`` without ``--linear-kind``: the kind distillation helps most (``benchmarks/kinds.py``; figures
in ``benchmarks/README.md``)."""
DEFAULT_KIND = "streaming"
"""No ``--distill`` and no ``--linear-kind``: sink + window heads (DuoAttention), which need no training. On
SmolLM2-135M at 25% of the KV cache they keep prose perplexity within 12% (17.8 -> 19.9) where elu heads
make it about 1,600 (``benchmarks/README.md``, "Real models")."""


@dataclass(frozen=True)
class ConvertOptions:
    """Options of one conversion (``hydracc convert``; ``hydracc.convert.convert``; ``run_conversion``).

    Only ``path`` is required; ``output`` is required unless ``dry_run``. Defaults are the CLI's.
    """

    path: Path = _opt(_MISSING, "The checkpoint: a .safetensors file with config.json beside it, or a folder.",
                      type=_PATH, argument=True)
    dry_run: bool = _opt(False, "Dry run: analyze, print the plan with its scores and the KV-cache change; write nothing "
                         "(except --plan-out/--plan-png).", flags=("--plan",), type=bool)
    output: Path | None = _opt(None, "Folder to write the converted checkpoint to (atomically).", flags=("-o", "--output"),
                               type=_PATH, optional=True)
    plan_file: Path | None = _opt(None, "Convert by this plan JSON instead of planning.", flags=("--plan-file",), type=_PATH,
                                  optional=True)
    plan_out: Path | None = _opt(None, "Write the plan JSON (with the scores) to this file (not inside the input; an existing "
                                 "file only with --force).", flags=("--plan-out",), type=_PATH,
                                 optional=True)
    plan_png: Path | None = _opt(None, "Draw a layers x heads heat map of the deciding score, full heads marked (needs "
                                 "matplotlib).", flags=("--plan-png",), type=_PATH, optional=True)
    # planning
    strategy: str = _opt("heads", "heads: keep the highest-scoring KV groups/heads full (runs the analysis); layers: whole "
                         "layers (layer-wise hybrid baseline); random: seeded control; even: spread evenly, no analysis.",
                         flags=("--strategy",), choices=("heads", "layers", "random", "even"))
    full_ratio: float | None = _opt(None, "Budget: fraction of units (KV groups under GQA/MQA, else heads) kept full. "
                                    "Default 0.25.", flags=("--full-ratio",), type=float, optional=True, min=0.0, max=1.0)
    kv_budget: float | None = _opt(None, "Budget: fraction of the original KV-cache bytes to keep (instead of --full-ratio).",
                                   flags=("--kv-budget",), type=float, optional=True, min=0.0, max=1.0)
    score: str = _opt("sensitivity", "Score that ranks units for --strategy heads (sensitivity = output KL when the unit is "
                      "made linear).", flags=("--score",), choices=("sensitivity", "retrieval", "linear_error"))
    sensitivity: str = _opt("auto", "How the sensitivity score is measured: auto (estimates from one backward sweep per "
                            "loss, then exact re-measurement of the --exact-k units nearest the budget's cut line; cost "
                            "linear in depth), estimate (estimates only), exact (re-run the layers after every unit; cost "
                            "grows with layers x units).", flags=("--sensitivity",), choices=("auto", "estimate", "exact"))
    exact_k: int = _opt(8, "With --sensitivity auto: units re-measured exactly, and jointly, around the cut line (all of "
                        "them when the model has no more; on larger models the window narrows until its joint "
                        "elimination takes at most 8 forward passes).", flags=("--exact-k",), type=int, min=0)
    objective: str = _opt("recall", "What the heads strategy protects first: recall (units whose loss hurts the prediction "
                          "at positions only copying can predict, then output KL for the rest of the budget; falls back "
                          "to kl, and says so, when the model does not recall on the calibration rows) or kl (output KL "
                          "over all positions).", flags=("--objective",), choices=("recall", "kl"))
    min_full_per_layer: int = _opt(0, "Keep at least this many units full in every layer.", flags=("--min-full-per-layer",),
                                   type=int, min=0)
    max_full_per_layer: int | None = _opt(None, "Keep at most this many units full in any layer.",
                                          flags=("--max-full-per-layer",), type=int, optional=True, min=0)
    keep_full: tuple[str, ...] = _opt((), "Keep these query heads full (layer.head; under GQA their whole KV group). "
                                      "Repeatable.", flags=("--keep-full",), multiple=True, metavar="L.H[,L.H]")
    force_linear: tuple[str, ...] = _opt((), "Make these query heads linear (under GQA their whole KV group). Repeatable.",
                                         flags=("--force-linear",), multiple=True, metavar="L.H[,L.H]")
    seed: int = _opt(0, "Seed for --strategy random, the hedgehog initialisation and --distill's minibatches.",
                     flags=("--seed",), type=int, min=0)
    linear_kind: str = _opt(None, "What converted heads become: elu (parameter-free linear attention), hedgehog (learned "
                            "feature map), gdn (gated delta rule), streaming (attention sink + sliding window, "
                            "DuoAttention). hedgehog and gdn get learned parameters: use --distill. Default: streaming, or gdn "
                            "with --distill (the kind distillation improves most).",
                            flags=("--linear-kind",), choices=linear_kind_choices, optional=True, show_default=False)
    sink: int | None = _opt(None, "Streaming heads: first tokens always attended (default 4).", flags=("--sink",), type=int,
                            optional=True, min=0)
    window: int | None = _opt(None, "Streaming heads: most recent tokens attended (default 64).", flags=("--window",),
                              type=int, optional=True, min=1)
    fusion: bool | None = _opt(None, "Scale-normalized fusion: normalize each linear head's output and scale it to the "
                               "original head's size (learned by --distill). Default: on with --distill or a learned kind.",
                               flags=("--fusion",), secondary="--no-fusion", type=bool, optional=True, show_default=False)
    # calibration
    calib: Path | None = _opt(None, "Calibration data: plain text, JSON lines with a \"text\" field, or token ids in .npy. "
                              "Default: built in (suits the example model; synthetic for other vocabularies).",
                              flags=("--calib",), type=_PATH, optional=True)
    calib_samples: int = _opt(16, "Calibration sequences.", flags=("--calib-samples",), type=int, min=1)
    seq_len: int = _opt(256, "Tokens per calibration sequence.", flags=("--seq-len",), type=int, min=2)
    # distillation
    distill: bool = _opt(False, "Train what conversion added (fusion scales, feature maps, gates) to match the original "
                         "heads on calibration data (stage 1, layer by layer), then optionally end to end (stage 2).",
                         flags=("--distill",), type=bool)
    steps: int = _opt(200, "--distill: attention-transfer steps per layer.", flags=("--steps",), type=int, min=0)
    e2e_steps: int = _opt(0, "--distill: end-to-end KL steps (0: skip stage 2).", flags=("--e2e-steps",), type=int, min=0)
    lr: float = _opt(1e-2, "--distill: stage 1 learning rate (Adam).", flags=("--lr",), type=float, min=0.0, min_open=True)
    e2e_lr: float = _opt(1e-3, "--distill: stage 2 learning rate.", flags=("--e2e-lr",), type=float, min=0.0, min_open=True)
    distill_samples: int = _opt(64, "--distill: calibration sequences to train on.", flags=("--distill-samples",), type=int,
                                min=1)
    distill_batch: int = _opt(8, "--distill: sequences per stage 1 step.", flags=("--distill-batch",), type=int, min=1)
    distill_holdout: float = _opt(0.125, "--distill: share of its calibration rows held out to judge each stage; the "
                                  "values with the lowest held-out loss are kept (0: train on all rows, keep the last).",
                                  flags=("--distill-holdout",), type=float, min=0.0, max=0.9)
    save_every: int = _opt(50, "--distill: steps between saved training states (OUTPUT.hydracc-distill/).",
                           flags=("--save-every",), type=int, min=1)
    resume: bool = _opt(False, "--distill: continue an interrupted run from its saved state (same inputs and options).",
                        flags=("--resume",), type=bool)
    device: str | None = _opt(None, "Torch device for the analysis and --distill (default: cuda when available, else cpu); "
                              "GPUs compute in the checkpoint's dtype, the CPU in float32.",
                              flags=("--device",), optional=True, show_default=False)
    # rewrite and emit
    user_passes: tuple[Any, ...] = _opt((), "Run a registered pass (after hybridize, before permute-heads). Repeatable.",
                                        flags=("--pass",), type=_PASSES, multiple=True, metavar="NAME")
    plugins: tuple[str, ...] = _opt((), "Load a Python file or module that registers passes. Repeatable.",
                                    flags=("--plugin",), multiple=True, metavar="FILE.py|MODULE")
    permute: bool = _opt(True, "Reorder heads in the weights so full heads are contiguous.", flags=("--permute",),
                         secondary="--no-permute", type=bool)
    force: bool = _opt(False, "Replace OUTPUT if it exists (only once the new one is complete; only a folder hydracc wrote), "
                      "and existing --plan-out/--plan-png files.", flags=("--force",), type=bool)
    max_shard_size: str | int = _opt("5GB", "Largest output shard, e.g. 5GB or 500MiB.", flags=("--max-shard-size",),
                                     type=_SIZE)
    onnx: bool = _opt(False, "Also export OUTPUT/onnx (prefill and decode graphs), checked with onnxruntime (see "
                      "export-onnx).", flags=("--onnx",), type=bool)
    atol: float = _opt(1e-4, "With --onnx: largest |onnxruntime - torch| accepted.", flags=("--atol",), type=float, min=0.0)
    base_model: str | None = _opt(None, "The model card's base_model (a Hub id such as Qwen/Qwen3-1.7B). Default: the input "
                                  "card's.", flags=("--base-model",), optional=True, metavar="HUB_ID", show_default=False)
    allow_nonfinite: bool = _opt(False, "Accept weights holding NaN or infinity (refused by default: every score and plan "
                                 "built on them is meaningless).", flags=("--allow-nonfinite",), type=bool)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        object.__setattr__(self, "linear_kind_given", self.linear_kind is not None)
        if self.linear_kind is None:  # the default kind: streaming, or gdn when distilling (benchmarks/README.md)
            object.__setattr__(self, "linear_kind", DISTILL_KIND if self.distill else DEFAULT_KIND)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, path: Any, **kwargs: Any) -> ConvertOptions:
        """Like the constructor, but an unknown keyword is an ``OptionError`` that suggests the right one."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names or key == "path":
                close = difflib.get_close_matches(key, names, n=1)
                raise OptionError(f"unknown conversion option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                                  hint="the options are the fields of hydracc.pipeline.ConvertOptions")
        return cls(path=path, **kwargs)

    def replace(self, **changes: Any) -> ConvertOptions:
        if not self.linear_kind_given:  # keep the kind a default: it follows distill, and a plan file may still decide
            changes.setdefault("linear_kind", None)
        return dataclasses.replace(self, **changes)

    # --- derived values -----------------------------------------------------------------
    @property
    def kind_params(self) -> dict[str, int] | None:
        """Plan parameters of the converted heads (``sink``/``window`` for streaming heads)."""
        params = {k: v for k, v in (("sink", self.sink), ("window", self.window)) if v is not None}
        return params or None

    @property
    def max_shard_bytes(self) -> int:
        from hydracc.emit.writer import parse_size

        return parse_size(self.max_shard_size)

    def distill_settings(self) -> Any:
        """``DistillSettings`` for ``--distill`` (``None`` without it)."""
        if not self.distill:
            return None
        from hydracc.distill.train import DistillSettings

        return DistillSettings(steps=self.steps, e2e_steps=self.e2e_steps, lr=self.lr, e2e_lr=self.e2e_lr,
                               batch=self.distill_batch, seed=self.seed, save_every=self.save_every,
                               holdout=self.distill_holdout, device=self.device)

    def budget(self) -> Any:
        """The planning budget (``None`` with a plan file)."""
        from hydracc.planning.budget import Budget

        if self.plan_file is not None:
            return None
        ratio = 0.25 if self.full_ratio is None and self.kv_budget is None else self.full_ratio
        return Budget(full_ratio=ratio, kv_budget=self.kv_budget, min_per_layer=self.min_full_per_layer,
                      max_per_layer=self.max_full_per_layer)

    # --- checks across options -----------------------------------------------------------
    def check(self, style: Style = "python") -> Any:
        """Check the options together, before any tensor is read; return the plan file's plan (or ``None``).

        Loads ``plugins`` (their passes register) and checks that every named pass exists.
        Messages name the flags (``style="cli"``) or the Python keywords (``"python"``).
        """
        n = _Namer(style)
        output_word = "-o OUTPUT" if style == "cli" else "an output folder"
        if not self.dry_run and self.output is None:
            raise OptionError(f"nothing to do: give {output_word} to convert, or {n('dry_run', True)} for a dry run")
        if self.dry_run and self.output is not None:
            drop_o = "drop -o" if style == "cli" else "give no output"
            raise OptionError(f"{n('dry_run', True)} is a dry run and writes no checkpoint: {drop_o}, or drop "
                              f"{n('dry_run', True)} to convert")
        try:
            self.max_shard_bytes  # noqa: B018
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{n('max_shard_size')}: {exc}") from exc
        _check_name_lengths(self, n)  # before any path is looked at
        if self.output is not None and not self.dry_run and self.output.exists() and not self.force:
            raise OutputError(f"output {self.output} already exists",
                              hint=f"choose a new path or {'add --force' if style == 'cli' else 'pass force=True'} to replace it")
        if self.output is not None and not self.dry_run:
            from hydracc.emit.writer import check_destination

            src = self.path.expanduser().resolve()
            src = src.parent if src.is_file() else src
            out = self.output.expanduser().resolve()
            if out == src or src.is_relative_to(out):
                raise OutputError(f"output {self.output} would replace the input checkpoint {self.path}",
                                  hint="write the converted checkpoint to a new folder")
            check_destination(self.output.expanduser().absolute(), self.force)  # parent, file, someone else's folder: now
        if self.base_model is not None and not (0 < len(self.base_model) <= 256 and self.base_model.isprintable()
                                                and not any(0xD800 <= ord(c) <= 0xDFFF for c in self.base_model)):
            raise OptionError(f"{n('base_model')} must be a Hub id such as Qwen/Qwen3-1.7B (printable text of at most 256 "
                              f"characters), got {self.base_model[:80].encode('utf-8', 'backslashreplace').decode('ascii', 'backslashreplace')!r}")
        if self.plan_file is not None:  # the plan file decides every head: a planning option would be ignored
            ignored = [name for name in _PLANNING_OPTIONS if getattr(self, name) != _default(name)]
            if self.linear_kind_given:
                ignored.insert(0, "linear_kind")
            if ignored:
                raise OptionError(f"{n('plan_file')} decides every head, so {', '.join(n(k) for k in ignored)} would be "
                                  "ignored", hint=f"drop {' and '.join(n(k) for k in ignored)}, or plan with them instead of "
                                  f"{n('plan_file')} (edit the plan file to change it)")
        if self.plan_file is None and self.full_ratio is not None and self.kv_budget is not None:
            raise OptionError(f"give one budget: {n('full_ratio')} or {n('kv_budget')}, not both")
        if self.max_full_per_layer is not None and self.max_full_per_layer < self.min_full_per_layer:
            raise OptionError(f"{n('max_full_per_layer')} ({self.max_full_per_layer}) is below {n('min_full_per_layer')} "
                              f"({self.min_full_per_layer})")
        self.budget()  # the planner's own checks, before any work
        targets: dict[Path, str] = {}
        for name in ("plan_out", "plan_png"):  # side files too: their folders are known now, not after the analysis
            target = getattr(self, name)
            if target is None:
                continue
            target = Path(target).expanduser()
            if target.is_dir():
                raise OutputError(f"{n(name)} {target} is a folder", hint="give a file path")
            if not target.parent.is_dir():
                raise OutputError(f"{n(name)} {target}: the folder {target.parent} does not exist",
                                  hint=f"create {target.parent} first, or choose another path")
            try:
                inside_input = _inside_input(target, self.path)
                resolved = target.resolve()
            except (OSError, RuntimeError) as exc:  # a symlink loop
                raise OutputError(f"{n(name)} {target}: {exc}", hint="give the path of a regular file") from None
            if inside_input:
                raise OutputError(f"{n(name)} {target} is inside the input checkpoint {self.path}",
                                  hint="hydracc never writes into its input: choose a path outside it")
            if self.output is not None and resolved.is_relative_to(self.output.expanduser().resolve()):
                raise OutputError(f"{n(name)} {target} is inside the output folder {self.output}, which is replaced "
                                  "whole at the end", hint="write it beside the output folder")
            if (target.exists() or target.is_symlink()) and not self.force:
                raise OutputError(f"{n(name)} {target} already exists",
                                  hint=f"choose a new path, or {'add --force' if style == 'cli' else 'pass force=True'} "
                                       "to replace it")
            if resolved in targets:
                raise OptionError(f"{n(targets[resolved])} and {n(name)} are the same file ({target})")
            targets[resolved] = name
        if self.plan_png is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError as exc:
                raise HydraError(f"{n('plan_png')} needs matplotlib", hint="pip install 'hydracc[plot]'") from exc
        redo = f"drop {n('dry_run', True)} and give {output_word}"
        if self.onnx and self.dry_run:
            raise OptionError(f"{n('onnx', True)} exports a converted checkpoint: {redo}")
        if self.onnx:
            require_onnx()  # before any work, not after the checkpoint is written
        from hydracc.passes import get_pass
        from hydracc.pipeline.stages import load_plugins

        load_plugins(self.plugins)
        for p in self.user_passes:
            if isinstance(p, str):
                get_pass(p)  # an unknown name fails now, before any work
        from hydracc.kernels.kinds import kind_by_name

        if self.kind_params is not None and not kind_by_name(self.linear_kind).windowed:
            raise OptionError(f"{n('sink')} and {n('window')} set streaming heads: add {n('linear_kind', 'streaming')}")
        if self.resume and not self.distill:
            raise OptionError(f"{n('resume', True)} continues a distillation: add {n('distill', True)}")
        if self.distill and self.fusion is False:
            raise OptionError(f"{n('distill', True)} trains the fusion scales: drop {n('fusion', False)}")
        if self.distill and self.dry_run:
            raise OptionError(f"{n('distill', True)} trains a converted model: {redo}")
        from hydracc.kernels.kinds import kind_by_name
        from hydracc.planning.plan import load_plan

        file_plan = load_plan(self.plan_file) if self.plan_file is not None else None
        if self.fusion is False and kind_by_name(self.linear_kind).learned and file_plan is None:
            raise OptionError(f"{n('fusion', False)}: {self.linear_kind} heads always come with fusion (their parameters "
                              "include the scales)",
                              hint=f"drop {n('fusion', False)}, or use {n('linear_kind', 'elu')} or streaming")
        if self.distill and file_plan is None and self.linear_kind == "streaming" and not self.fusion:
            raise OptionError(f"{n('distill', True)}: streaming heads have nothing to train",
                              hint=f"drop {n('distill', True)}, or add {n('fusion', True)}")
        if self.onnx:
            from hydracc.export.onnx import EXPORTABLE_KINDS

            kinds = [self.linear_kind] if file_plan is None else [h.kind for lp in file_plan.layers for h in lp.heads]
            unsupported = sorted(set(kinds) - EXPORTABLE_KINDS)
            if unsupported:
                raise OptionError(f"{n('onnx', True)}: the ONNX export does not support {', '.join(unsupported)} heads yet",
                                  hint=f"it exports {', '.join(sorted(EXPORTABLE_KINDS))} heads; convert without "
                                       f"{n('onnx', True)}")
        settings = self.distill_settings()
        if settings is not None:
            _check_device(settings, n)
        elif self.device is not None:
            check_device(self.device, n("device"))
        return file_plan


def _inside_input(target: Path, checkpoint: Path) -> bool:
    """Whether writing ``target`` would change the input: a file inside an input folder, or one of the files of a
    single-file input (the weights and their shards, ``config.json``, the index, the side files a conversion
    copies, the card)."""
    from hydracc.emit.writer import SIDE_FILES

    src = checkpoint.expanduser().resolve()
    dest = target.resolve()
    if src.is_dir():
        return dest.is_relative_to(src)
    ours = {"config.json", "model.safetensors.index.json", "README.md", *SIDE_FILES}
    return dest == src or (dest.parent == src.parent and (dest.name in ours or dest.suffix == ".safetensors"))


_PLANNING_OPTIONS = ("strategy", "full_ratio", "kv_budget", "score", "sensitivity", "exact_k", "objective",
                     "min_full_per_layer", "max_full_per_layer", "keep_full", "force_linear", "sink", "window")
"""Options that only choose a plan: with a plan file, giving one is an error (it would be ignored)."""


def _default(name: str) -> Any:
    return ConvertOptions.__dataclass_fields__[name].default


def _check_name_lengths(o: ConvertOptions, n: _Namer) -> None:
    """Every path's names fit the filesystem (the output's with the temporary folder's suffix), before any path is
    looked at: an over-long name would otherwise end in ``OSError: File name too long``, perhaps after the work;
    and ``calib`` is a regular file (not a folder, ``/dev/zero`` or a pipe)."""
    from hydracc.analysis.calibration import check_calibration_file
    from hydracc.errors import CheckpointError
    from hydracc.paths import SIDE_NAME_EXTRA, TEMP_NAME_EXTRA, check_name_length

    check_name_length(o.path, "checkpoint path", error=CheckpointError)
    if o.output is not None:
        check_name_length(o.output, "output", extra=TEMP_NAME_EXTRA)
    for name, extra in (("plan_out", SIDE_NAME_EXTRA), ("plan_png", SIDE_NAME_EXTRA), ("plan_file", 0), ("calib", 0)):
        if getattr(o, name) is not None:
            check_name_length(getattr(o, name), n(name), extra=extra, error=OutputError if extra else OptionError)
    if o.calib is not None:
        check_calibration_file(o.calib)


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise HydraError("ONNX export needs onnx, onnxscript and onnxruntime", hint="pip install 'hydracc[onnx]'") from exc


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a torch device that does not parse or does not exist on this machine, before any work."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise OptionError(f"{flag} {device!r}: {exc}") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"{flag} {device}: this machine has no CUDA device", hint=f"drop {flag} to run on the CPU")
    if parsed.type not in ("cpu", "cuda", "meta") and not hasattr(torch, parsed.type):
        raise OptionError(f"{flag} {device}: unknown device type")


def _check_device(settings: Any, n: _Namer) -> None:
    """Refuse a device that does not exist here, before any work."""
    import torch

    try:
        device = settings.torch_device()
    except (RuntimeError, ValueError) as exc:
        raise OptionError(f"{n('device')} {settings.device!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"{n('device')} {settings.device}: this machine has no CUDA device",
                          hint=f"drop {n('device')} to train on the CPU")


class _Namer:
    """How a message names an option: ``--kv-budget`` / ``--no-fusion`` (cli) or ``kv_budget`` / ``fusion=False``."""

    def __init__(self, style: Style) -> None:
        self.style = style
        self.fields = {f.name: f.metadata for f in dataclasses.fields(ConvertOptions)}

    def __call__(self, name: str, value: Any = _MISSING) -> str:
        meta = self.fields[name]
        if self.style == "python":
            return name if value is _MISSING else f"{name}={value!r}"
        if value is False and meta["secondary"]:
            return meta["secondary"]
        flag = meta["flags"][-1]
        if value is _MISSING or isinstance(value, bool):
            return flag
        return f"{flag} {value}"


def flag_of(name: str) -> str:
    """The command-line flag of the field ``name`` (``kv_budget`` -> ``--kv-budget``)."""
    return _Namer("cli")(name)


# --- single-value checks ---------------------------------------------------------------------

def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    meta: Mapping[str, Any] = f.metadata
    name, kind, given = f.name, meta["type"], value

    def bad(expected: str) -> OptionError:
        return OptionError(f"{name} must be {expected}, got {given!r} ({type(given).__name__})")

    if value is None:
        if meta["optional"]:
            return None
        raise bad("given (not None)")
    if meta["multiple"]:
        if isinstance(value, (str, os.PathLike)):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise bad("a list of " + ("pass names or pass functions" if kind == _PASSES else "strings"))
        for item in value:
            ok = isinstance(item, str) or (kind == _PASSES and callable(item)) or (kind is _PATH and isinstance(item, os.PathLike))
            if not ok:
                raise OptionError(f"{name}: every item must be a " + ("pass name or function" if kind == _PASSES else "string")
                                  + f", got {item!r} ({type(item).__name__})")
        return tuple(str(v) if isinstance(v, os.PathLike) else v for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("True or False")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("a finite number")
    elif kind is _PATH:
        if not isinstance(value, (str, os.PathLike)):
            raise bad("a path")
        return Path(value)
    elif kind == _SIZE:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise bad("a size such as '5GB' or a number of bytes")
        return value
    elif not isinstance(value, str):
        raise bad("a string")
    choices = meta["choices"]
    if choices is not None:
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            raise OptionError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {given!r}")
    lo, hi = meta["min"], meta["max"]
    if lo is not None and (value < lo or (meta["min_open"] and value == lo)):
        raise bad(_range_words(meta))
    if hi is not None and value > hi:
        raise bad(_range_words(meta))
    return value


def _range_words(meta: Mapping[str, Any]) -> str:
    number = "an integer" if meta["type"] is int else "a number"
    lo, hi = meta["min"], meta["max"]
    if hi is None:
        return f"{number} {'>' if meta['min_open'] else '>='} {lo:g}"
    return f"{number} from {lo:g} to {hi:g}"
