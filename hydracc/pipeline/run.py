"""The one conversion: ``run_conversion(options)`` chains the stages; ``convert(path, out, **kwargs)`` is its Python face.

Design decisions:
- Exactly one function runs a conversion. ``hydracc convert`` (with or without ``--plan``),
  ``hydracc.convert.convert`` and the benchmarks all call ``run_conversion``; what they differ
  in (bars, tables, the JSON report) goes through ``ProgressHooks`` and ``ConversionResult``.
- Order: every check that needs no tensor data (``ConvertOptions.check``) runs first, then
  inspect -> [analyze] -> plan -> [--plan-out/--plan-png] -> (dry run stops) -> [learn params]
  -> rewrite -> emit -> [ONNX export]. The order of the stages is what makes outputs byte for
  byte the same as before the pipeline was unified (``tests/test_golden_outputs.py``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydracc import distributed
from hydracc.errors import HydraError, OutputError, Terminated
from hydracc.pipeline.options import ConvertOptions, OptionError, Style


class ProgressHooks:
    """What ``run_conversion`` reports while it works; subclass and override what you need (all no-ops here).

    ``begin(stage, total)`` and ``end(stage)`` bracket each long stage: ``"analyze"`` (total:
    None, then ``analyzed``), ``"distill"`` or ``"initialise"`` (learned parameters; then
    ``distilled`` per step), ``"write"`` (total: bytes; then ``wrote`` per tensor) and
    ``"onnx"``. ``end`` runs also when the stage fails. ``converted(result)`` runs once the
    checkpoint is written (or, in a dry run, the plan is made), before any ONNX export.
    """

    def begin(self, stage: str, total: int | None = None) -> None:
        pass

    def end(self, stage: str) -> None:
        pass

    def analyzed(self, done: int, total: int) -> None:
        pass

    def distilled(self, stage: str, step: int, steps: int, loss: float) -> None:
        pass

    def wrote(self, name: str, nbytes: int) -> None:
        pass

    def converted(self, result: Any) -> None:
        pass


_HOOK_METHODS = ("begin", "end", "analyzed", "distilled", "wrote", "converted")


def check_hooks(progress: Any) -> None:
    """``progress`` must be ``None`` or a ``ProgressHooks`` (or an object with all its methods): an ``OptionError``
    now, not an ``AttributeError`` once the work has started."""
    if progress is None or isinstance(progress, ProgressHooks):
        return
    missing = [m for m in _HOOK_METHODS if not callable(getattr(progress, m, None))]
    if missing:
        raise OptionError(f"progress must be a ProgressHooks or None, got {progress!r} ({type(progress).__name__}), "
                          f"which has no {', '.join(missing)} method{'s' if len(missing) > 1 else ''}",
                          hint="subclass hydracc.pipeline.ProgressHooks and override the methods you need")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a conversion, with what was kept (``str(exc)``; the CLI prints it and exits 130)."""


@contextmanager
def _stage(hooks: ProgressHooks, stage: str, total: int | None = None) -> Iterator[None]:
    hooks.begin(stage, total)
    try:
        yield
    finally:
        hooks.end(stage)


def run_conversion(options: ConvertOptions, *, progress: ProgressHooks | None = None, style: Style = "python") -> Any:
    """Run one conversion (or, with ``options.dry_run``, plan one) and return its ``ConversionResult``.

    ``style`` only picks how error messages name options (``"cli"``: flags). Raises a
    ``HydraError`` for anything the user can fix; nothing is written to ``options.output`` unless
    everything succeeded.
    """
    check_hooks(progress)  # before any work (or import)
    from hydracc.distill.state import TrainingState, state_dir_for
    from hydracc.kernels.kinds import kind_by_name
    from hydracc.pipeline import stages
    from hydracc.planning.plan import cache_cost

    if not isinstance(options, ConvertOptions):
        raise OptionError(f"run_conversion takes a ConvertOptions, got {type(options).__name__}")
    hooks = progress if progress is not None else ProgressHooks()
    o = options
    file_plan = o.check(style)
    distributed.init()  # under torchrun: join the other processes (a no-op alone)
    device = o.device if o.device is not None or distributed.world_size() == 1 else str(distributed.local_device())
    settings = o.distill_settings()
    if settings is not None and settings.device is None and device is not None:
        settings = dataclasses.replace(settings, device=device)
    budget = o.budget()
    want_fusion = True if o.distill else o.fusion
    needs_analysis = o.plan_file is None and o.strategy == "heads"
    may_learn = bool(want_fusion) or kind_by_name(o.linear_kind).learned or (
        file_plan is not None and stages.needs_learned_params(file_plan))
    samples = max(o.calib_samples, o.distill_samples if o.distill else 0)
    dtype = stages.capture_dtype(device)
    # the distillation state folder beside the output is claimed before any work: a folder of the
    # user's, or of another live run, is refused now; only what this run wrote is removed later
    state = TrainingState(state_dir_for(o.output), "") if settings is not None and o.output is not None else None
    if state is not None:
        state.claim(resume=o.resume)
    insp = None
    try:
        insp = stages.inspect_checkpoint(o.path, dtype=dtype, calibration=(samples, o.seq_len)
                                         if needs_analysis or may_learn else None)
        insp.checkpoint.allow_nonfinite = o.allow_nonfinite
        analysis = None
        if needs_analysis:  # a plan by the same rules without scores: --keep-full and the rest fail now, not after the analysis
            stages.make_plan(insp, budget=budget, strategy="even", keep_full=o.keep_full, force_linear=o.force_linear,
                             linear_kind=o.linear_kind, kind_params=o.kind_params, fusion=want_fusion)
        if needs_analysis:
            calibration = stages.calibration_for(insp, o.calib, samples=o.calib_samples, seq_len=o.seq_len)
            with _stage(hooks, "analyze"):
                analysis = stages.analyze_heads(insp, calibration, linear_kind=o.linear_kind, kind_params=o.kind_params,
                                                fusion=bool(want_fusion), method=o.sensitivity, objective=o.objective,
                                                exact_k=o.exact_k, device=device,
                                                cut=stages.budget_cut(insp, budget) if budget is not None else None,
                                                progress=hooks.analyzed)
        plan = stages.make_plan(insp, plan_file=o.plan_file, budget=budget, strategy=o.strategy, analysis=analysis,
                                score=o.score, keep_full=o.keep_full, force_linear=o.force_linear, linear_kind=o.linear_kind,
                                seed=o.seed, kind_params=o.kind_params, fusion=want_fusion, other_model=o.force)
        if o.fusion is False and any(lp.has_learned_kind() for lp in plan.layers):
            no_fusion = "--no-fusion" if style == "cli" else "fusion=False"
            raise OptionError(f"{no_fusion}: the plan has hedgehog or gdn heads, which always come with fusion")
        cost = cache_cost(plan, insp.captured.sites, insp.element_bytes)
        result = stages.ConversionResult(insp, plan, cost, analysis=analysis, dry_run=o.dry_run)
        main = distributed.is_main()  # under torchrun rank 0 alone writes; the others help analyze and train
        if o.plan_out is not None and main:
            _write_text_atomic(o.plan_out, plan.dumps())
        if o.plan_png is not None and main:
            from hydracc.planning.plot import draw_plan

            draw_plan(plan, o.plan_png, score=o.score if o.strategy == "heads" else "sensitivity")
        if not o.dry_run:
            output = o.output
            assert output is not None
            if stages.needs_learned_params(plan) or settings is not None:
                rows = stages.calibration_for(insp, o.calib, samples=o.distill_samples if o.distill else o.calib_samples,
                                              seq_len=o.seq_len)
                try:
                    with _stage(hooks, "distill" if settings is not None else "initialise"):
                        result.learned = stages.learn_params(insp, plan, rows, settings=settings, out=output, resume=o.resume,
                                                             progress=hooks.distilled, device=device)
                except KeyboardInterrupt as exc:
                    saved = (f"; the training state is saved in {state.dir}: rerun with "
                             f"{'--resume' if style == 'cli' else 'resume=True'} to continue") if state is not None and \
                        state.has_state() else ""
                    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
                    raise (Terminated if isinstance(exc, Terminated) else Interrupted)(
                        f"{what}; nothing was written to {output}{saved}") from exc
            if not main:
                return result
            result.rewrite = stages.rewrite(insp, plan, user_passes=o.user_passes, permute=o.permute)
            total = sum(insp.checkpoint.info(name).nbytes for name in insp.weight_names.values())
            with _stage(hooks, "write", total):
                result.files = stages.emit(insp, result.rewrite, output, force=o.force, max_shard_bytes=o.max_shard_bytes,
                                           on_tensor=hooks.wrote, learned=result.learned, base_model=o.base_model)
            result.output = output
            if state is not None:
                state.release()
    finally:
        if insp is not None:
            insp.checkpoint.close()
        if state is not None:
            state.release(keep_state=True)  # a saved state stays for --resume; a claim that saved nothing goes
    hooks.converted(result)
    if o.onnx:
        from hydracc.export.onnx import export_onnx

        assert result.output is not None
        with _stage(hooks, "onnx"):
            result.onnx = export_onnx(result.output, None, atol=o.atol, check_tokens=8, force=False,
                                        allow_nonfinite=o.allow_nonfinite, check_hashes=False)  # (written just now)
    return result


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc


_LEGACY = ("max_shard_bytes", "distill_settings", "kind_params")


def convert(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
            progress: ProgressHooks | None = None, **kwargs: Any) -> Any:
    """The whole conversion from Python: ``hydracc convert PATH -o OUT`` (``dry_run=True``: ``--plan``).

    ``kwargs`` are the fields of :class:`ConvertOptions` (``kv_budget=0.25``,
    ``strategy="even"``, ``linear_kind="gdn"``, ``distill=True``, ``steps=300``,
    ``user_passes=[...]`` names or functions, ...), with the CLI's defaults. Older spellings
    still work: ``max_shard_bytes`` (for ``max_shard_size``), ``kind_params`` (for
    ``sink``/``window``) and ``distill_settings`` (a ``DistillSettings``, for ``distill=True``
    and its settings; its seed is the conversion's ``seed`` unless that is given). A wrong
    type, an unknown keyword or conflicting options raise ``HydraError`` before any work.
    """
    check_hooks(progress)
    kwargs = _legacy_kwargs(kwargs)
    if out is not None:
        kwargs["output"] = out
    options = ConvertOptions.from_kwargs(path, **kwargs)
    return run_conversion(options, progress=progress, style="python")


def _legacy_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if "max_shard_bytes" in kwargs:
        kwargs.setdefault("max_shard_size", kwargs.pop("max_shard_bytes"))
    if "kind_params" in kwargs:
        params = kwargs.pop("kind_params") or {}
        if not isinstance(params, dict) or set(params) - {"sink", "window"}:
            raise OptionError(f"kind_params must be a dict with 'sink' and/or 'window', got {params!r}")
        for key, value in params.items():
            kwargs.setdefault(key, value)
    settings = kwargs.pop("distill_settings", None)
    if settings is not None:
        from hydracc.distill.train import DistillSettings

        if not isinstance(settings, DistillSettings):
            raise OptionError(f"distill_settings must be a DistillSettings, got {type(settings).__name__}")
        if kwargs.get("distill") is False:
            raise HydraError("distill_settings given with distill=False")
        kwargs.update(distill=True, steps=settings.steps, e2e_steps=settings.e2e_steps, lr=settings.lr,
                      e2e_lr=settings.e2e_lr, distill_batch=settings.batch, save_every=settings.save_every,
                      device=settings.device)
        kwargs.setdefault("seed", settings.seed)
        if kwargs["seed"] != settings.seed:
            raise OptionError(f"seed={kwargs['seed']} and distill_settings.seed={settings.seed} differ: one seed drives "
                              "both; pass seed= (and distill=True, steps=...) instead of distill_settings")
    return kwargs
