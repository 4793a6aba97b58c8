"""Distill stage: initialise and train what conversion added (fusion scales, feature maps, gates).

Design decisions:
- Training runs on the captured, *unrewritten* graph in original head order, like analysis,
  one layer at a time (``analysis.layerwise``: weights read from the checkpoint as their layer
  runs, so memory follows a layer, not the model). Values are keyed by checkpoint name
  (``{module}.hydra.{name}``, rows per original query head); emit reorders their rows with the
  same edits as the q/k/v/o weights, so this stage never reads the rewritten graph.
- Initialisation is measured on calibration data from the original heads: fusion scale = the
  head's mean output RMS (linear outputs are normalized, then brought to the original head's
  scale); the learned kinds' own rules (``HeadKind.init_params``: hedgehog a scaled Gaussian
  feature map, gdn a decay matched to the head's mean attention distance), seeded per head.
- Stage 1, attention transfer: one sweep over the layers; each layer's q, k, v and original
  output are recorded (``records.py``) and its linear heads' fused outputs fitted to the original
  heads' (relative squared error: sum over heads of ``sum |fused - original|^2 / sum
  |original|^2``, Adam) before the sweep moves on. Memory: one layer's activations.
- Stage 2 (optional, ``e2e.py``): KL(original || converted) end to end, every layer's added
  parameters together, with gradient checkpointing at layer boundaries.
- Several processes (``torchrun``, ``hydracc.distributed``): each records and trains on its own
  calibration rows; the loss's sums and the gradients are added up over processes, so every
  process takes the same steps as one process would on all rows. Rank 0 alone saves state.
- Deterministic: minibatch rows are drawn from a generator seeded by (seed, stage, layer, step),
  so a resumed run draws what an uninterrupted one would (``state.py``).
- Never worse than where it started, on rows it never trained on: ``holdout`` of the calibration
  rows (evenly spaced, so every kind of row is represented) are held out. Stage 1 keeps, per
  layer, the values with the lowest held-out transfer error it saw (checked every ``steps // 8``
  steps); then the held-out end-to-end KL of the starting values and of stage 1's decides which
  stage 2 starts from, and stage 2 keeps its best check (every ``e2e_steps // 5`` steps). The
  result reports every held-out figure and which values were kept.
- A non-finite loss or gradient stops training with an error instead of emitting broken parameters; so does
  a NaN or infinity in any layer of the original or converted model, the teacher's logits or the held-out
  KL (``NonFiniteError`` from ``analysis.layerwise``, raised as a ``DistillError`` naming the layer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hydracc import distributed
from hydracc.analysis.calibration import Calibration, local_rows
from hydracc.analysis.initial import head_seed, initial_layer_params
from hydracc.analysis.layerwise import NonFiniteError
from hydracc.device import default_device
from hydracc.distill.e2e import STUDENT_HINT, Teacher, held_out_kl, kl_step
from hydracc.distill.records import SiteRecord, Weights, record_sites, runner_for, sweep_records
from hydracc.distill.state import DistillError, TrainingState, fingerprint, restore_adam, state_dir_for
from hydracc.frontend.capture import AttentionSite, CapturedModel
from hydracc.kernels.kinds import FUSION_PARAM, PARAM_NAMES, kind_by_name
from hydracc.kernels.naive import fuse_linear_output, run_kind
from hydracc.planning.plan import LayerPlan, Plan

__all__ = [
    "DistillError", "DistillResult", "DistillSettings", "SiteRecord", "distill", "initial_params", "initial_values",
    "layer_initial_params", "param_name", "record_sites", "state_dir_for", "transfer_loss",
]

Progress = Callable[[str, int, int, float], None]
"""``progress(stage_label, step, steps, loss)`` after every training step."""


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 200
    """Attention-transfer steps per layer (stage 1)."""
    e2e_steps: int = 0
    """End-to-end KL steps (stage 2); 0 skips it."""
    lr: float = 1e-2
    e2e_lr: float = 1e-3
    batch: int = 8
    """Calibration rows per step (both stages)."""
    seed: int = 0
    save_every: int = 50
    holdout: float = 0.125
    """Share of the calibration rows held out to judge each stage (0: train on all, keep the last values)."""
    device: str | None = None
    """Where to train: ``None`` picks CUDA when available, else CPU."""

    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return default_device()

    def __post_init__(self) -> None:
        if self.steps < 0 or self.e2e_steps < 0:
            raise DistillError(f"--steps and --e2e-steps must be >= 0, got {self.steps} and {self.e2e_steps}")
        if not (self.lr > 0 and self.e2e_lr > 0):
            raise DistillError(f"learning rates must be positive, got {self.lr} and {self.e2e_lr}")
        if self.batch < 1 or self.save_every < 1:
            raise DistillError("--distill-batch and the save interval must be >= 1")
        if not 0.0 <= self.holdout < 1.0:
            raise DistillError(f"the held-out share must be in [0, 1), got {self.holdout}")


@dataclass
class DistillResult:
    values: dict[str, Tensor]
    """Checkpoint name -> tensor, rows in original head order."""
    settings: DistillSettings | None
    losses: dict[str, Any] = field(default_factory=dict)
    held_out: dict[str, Any] = field(default_factory=dict)
    """Held-out end-to-end KL (per position) of the starting values and after each stage, and which were kept."""

    def record(self) -> dict[str, Any]:
        """What the ``hydra`` section keeps about the training."""
        return {"settings": asdict(self.settings) if self.settings else None, "losses": self.losses,
                **({"held_out": self.held_out} if self.held_out else {})}


def param_name(site: AttentionSite, name: str) -> str:
    return f"{site.module}.hydra.{name}"


# --- initialisation --------------------------------------------------------------------------


def _head_sums(rec: SiteRecord, group: int, scale: float) -> tuple[Tensor, Tensor, int]:
    """Per head, summed over rows and positions: output RMS and mean attended distance; and the count."""
    rms = rec.out.pow(2).mean(-1).sqrt().double().sum(dim=(0, 2))  # [Hq]
    k = rec.k.repeat_interleave(group, dim=1)
    t = rec.q.shape[2]
    pos = torch.arange(t, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).clamp_min(0)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    distance = []
    for h in range(rec.q.shape[1]):
        probs = ((rec.q[:, h] @ k[:, h].transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        distance.append(float((probs * dist).sum(-1).double().sum()))
    return rms, torch.tensor(distance, dtype=torch.float64), rec.q.shape[0] * t


def _init_from_means(lp: LayerPlan, site: AttentionSite, rms: Tensor, distance: Tensor, seed: int) -> dict[str, Tensor]:
    init = initial_layer_params([h.kind for h in lp.heads], site.head_dim, site.scale, rms, distance, lp.layer, seed)
    return {param_name(site, name): value for name, value in init.items()}


def _layer_init(lp: LayerPlan, site: AttentionSite, rec: SiteRecord, seed: int) -> dict[str, Tensor]:
    """Starting values from this process's records, with the sums added up over processes."""
    rms, distance, count = _head_sums(rec, site.num_heads // site.num_kv_heads, site.scale)
    totals = distributed.sum_arrays({"rms": rms.numpy(), "distance": distance.numpy(), "count": np.array([count])})
    n = float(totals["count"][0])
    return _init_from_means(lp, site, torch.from_numpy(totals["rms"]) / n, torch.from_numpy(totals["distance"]) / n, seed)


def layer_initial_params(lp: LayerPlan, site: AttentionSite, rec: SiteRecord, seed: int = 0) -> dict[str, Tensor]:
    """Starting values of one layer's learned parameters, measured on its recorded activations."""
    rms, distance, count = _head_sums(rec, site.num_heads // site.num_kv_heads, site.scale)
    return _init_from_means(lp, site, rms / count, distance / count, seed)


def initial_params(plan: Plan, sites: list[AttentionSite], records: dict[int, SiteRecord], seed: int = 0) -> dict[str, Tensor]:
    """Starting values of every layer's learned parameters from records (see the module docstring)."""
    by_layer = {s.layer: s for s in sites}
    values: dict[str, Tensor] = {}
    for lp in plan.layers:
        if plan.layer_has_params(lp):
            values.update(layer_initial_params(lp, by_layer[lp.layer], records[lp.layer], seed))
    return values


def initial_values(captured: CapturedModel, weights: Weights, plan: Plan, calibration: Calibration, seed: int = 0, *,
                   device: Any = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The starting values measured in one sweep, one layer's activations at a time."""
    values: dict[str, Tensor] = {}

    def on_layer(layer: int, rec: SiteRecord) -> None:
        values.update(_layer_init(plan.layer(layer), captured.site(layer), rec, seed))

    layers = {lp.layer for lp in plan.layers if plan.layer_has_params(lp)}
    sweep_records(runner_for(captured, weights, device, dtype), local_rows(calibration), layers, on_layer)
    return values


_seed = head_seed  # the per-head seed rule (``analysis.initial.head_seed``)


def split_rows(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """``(train, held)`` global row indices: ``round(holdout * n)`` evenly spaced rows held out (none if that
    would leave no row to train on)."""
    k = round(holdout * n)
    if k < 1 or k >= n:
        return list(range(n)), []
    held = sorted({int(i * n / k) for i in range(k)})
    out = set(held)
    return [i for i in range(n) if i not in out], held


def _rows(seed: int, stage: int, layer: int, step: int, train: list[int], batch: int) -> Tensor:
    gen = torch.Generator().manual_seed(_seed(seed, stage, layer, step))
    return torch.tensor(train, dtype=torch.long)[torch.randperm(len(train), generator=gen)[: min(batch, len(train))]]


def _held_transfer(rec: SiteRecord, rows: list[int], lp: LayerPlan, site: AttentionSite, params: list[Tensor]) -> float:
    """The layer's relative transfer error on the held-out ``rows`` (this process's share; summed over processes)."""
    heads = sum(kind_by_name(h.kind).linear for h in lp.heads)
    with torch.no_grad():
        if rows:
            num, den = transfer_sums(rec, rows, lp, site, dict(zip(PARAM_NAMES, params)))
            num, den = num.double().cpu().numpy(), den.double().cpu().numpy()
        else:
            num, den = np.zeros(heads), np.zeros(heads)
    totals = distributed.sum_arrays({"num": num, "den": den})
    return float((totals["num"] / np.maximum(totals["den"], 1e-12)).mean())


def _mine(rows: Tensor) -> list[int]:
    """The drawn (global) calibration rows this process holds, as indices into its own rows."""
    w, r = distributed.world_size(), distributed.rank()
    return [int(i) // w for i in rows.tolist() if int(i) % w == r]


# --- stage 1 ---------------------------------------------------------------------------------


def transfer_sums(rec: SiteRecord, rows: Tensor | list[int], lp: LayerPlan, site: AttentionSite,
                  params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Per linear head of the layer: ``sum |fused - original|^2`` (differentiable) and ``sum |original|^2`` on ``rows``."""
    group = site.num_heads // site.num_kv_heads
    device = next(iter(params.values())).device
    rows = torch.as_tensor(rows, dtype=torch.long)
    nums, dens = [], []
    for code in sorted({kind_by_name(h.kind).code for h in lp.heads if kind_by_name(h.kind).linear}):
        heads = torch.tensor([h for h, hp in enumerate(lp.heads) if kind_by_name(hp.kind).code == code])
        q = rec.q[rows].index_select(1, heads).to(device)
        k = rec.k[rows].index_select(1, heads // group).to(device)
        v = rec.v[rows].index_select(1, heads // group).to(device)
        target = rec.out[rows].index_select(1, heads).to(device)
        selected = {name: t.index_select(0, heads.to(device)) for name, t in params.items()}
        out = fuse_linear_output(run_kind(code, q, k, v, site.scale, params=selected), selected[FUSION_PARAM])
        nums.append((out - target).pow(2).sum(dim=(0, 2, 3)))
        dens.append(target.pow(2).sum(dim=(0, 2, 3)))
    return torch.cat(nums), torch.cat(dens)


def transfer_loss(rec: SiteRecord, rows: Tensor, lp: LayerPlan, site: AttentionSite, params: dict[str, Tensor]) -> Tensor:
    """Mean over the layer's linear heads of ``|fused - original|^2 / |original|^2`` on ``rows`` (one process)."""
    num, den = transfer_sums(rec, rows, lp, site, params)
    return (num / den.clamp_min(1e-12)).mean()


def _transfer_step(rec: SiteRecord, rows: list[int], lp: LayerPlan, site: AttentionSite, params: list[Tensor]) -> float:
    """Backward of the relative error over every process's share of ``rows``; returns the loss."""
    named = dict(zip(PARAM_NAMES, params))
    heads = sum(kind_by_name(h.kind).linear for h in lp.heads)
    if rows:
        num, den = transfer_sums(rec, rows, lp, site, named)
    else:  # this process holds none of the step's rows
        num = torch.zeros(heads, device=params[0].device, requires_grad=True)
        den = torch.zeros(heads, device=params[0].device)
    totals = distributed.sum_arrays({"num": num.detach().double().cpu().numpy(), "den": den.double().cpu().numpy()})
    total_den = torch.from_numpy(totals["den"]).clamp_min(1e-12).to(num.device, num.dtype)
    (num / total_den).mean().backward()
    for p in params:  # every process adds a gradient, none where it held no rows
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    distributed.sum_tensors([p.grad for p in params])
    return float((torch.from_numpy(totals["num"]) / torch.from_numpy(totals["den"]).clamp_min(1e-12)).mean())


def _nonfinite_is_distill_error(fn: Callable[..., DistillResult]) -> Callable[..., DistillResult]:
    """A NaN or infinity met while distilling (``NonFiniteError``: the layer, its likely cause) is a ``DistillError``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> DistillResult:
        try:
            return fn(*args, **kwargs)
        except NonFiniteError as exc:
            raise DistillError(f"distillation stopped: {exc.message}", hint=exc.hint) from exc

    return wrapper


@_nonfinite_is_distill_error
def distill(
    captured: CapturedModel,
    weights: Weights,
    plan: Plan,
    calibration: Calibration,
    settings: DistillSettings,
    *,
    state_dir: Path | None = None,
    fingerprint: str = "",
    resume: bool = False,
    progress: Progress | None = None,
    records: dict[int, SiteRecord] | None = None,
    dtype: torch.dtype | None = None,
) -> DistillResult:
    """Initialise and train the plan's added parameters; returns values in original head order (CPU).

    Trains on ``settings.device``; recorded activations stay on the CPU and move a minibatch at a
    time. ``weights``: in memory, or read by name as their layer runs. ``records``: one process's
    recorded activations per layer, instead of recording them here.
    """
    device = settings.torch_device()
    runner = runner_for(captured, weights, device, dtype)
    local = local_rows(calibration)
    train_rows, held_rows = split_rows(calibration.samples, settings.holdout)
    held_mine = _mine(torch.tensor(held_rows, dtype=torch.long))
    layers = [lp for lp in plan.layers if plan.layer_has_params(lp)]
    state = TrainingState(state_dir, _state_fingerprint(fingerprint, settings, plan, calibration)) if state_dir is not None else None
    position: dict[str, Any] = {"stage": 1, "layer_index": 0, "step": 0, "losses": {}, "best": {}, "held_out": {}}
    values: dict[str, Tensor] = {}
    initial: dict[str, Tensor] = {}
    """Every layer's starting values (to compare against on the held-out rows)."""
    best: dict[str, Tensor] = {}
    """The best values held out so far: the current layer's (stage 1) or all of them (stage 2)."""
    saved: dict[str, Tensor] = {}
    if resume:
        if state is None:
            raise DistillError("--resume needs a state directory")
        position, saved = state.load()

        def part(prefix: str) -> dict[str, Tensor]:
            return {k.removeprefix(prefix): t.clone() for k, t in saved.items() if k.startswith(prefix)}

        values, initial, best = part("param/"), part("initial/"), part("best/")
    losses: dict[str, Any] = position.get("losses", {})
    track: dict[str, Any] = position.setdefault("best", {})
    """``loss`` of ``best`` and, for stage 1, the layer's ``first`` held-out loss."""
    held_out: dict[str, Any] = position.setdefault("held_out", {})

    def checkpoint(opt: torch.optim.Adam | None, names: list[str]) -> None:
        if state is not None:
            extra = {**{f"initial/{k}": v for k, v in initial.items()}, **{f"best/{k}": v for k, v in best.items()}}
            state.save(values, opt, names, {**position, "losses": losses, "best": track, "held_out": held_out}, extra)

    @torch.enable_grad()  # called from inside the recording sweep, which runs without autograd
    def train_layer(layer: int, rec: SiteRecord) -> None:
        index = next(i for i, lp in enumerate(layers) if lp.layer == layer)
        if position["stage"] > 1 or index < position["layer_index"]:
            return
        lp, site = layers[index], captured.site(layer)
        names = [param_name(site, n) for n in PARAM_NAMES]
        if names[0] not in values:
            values.update(_layer_init(lp, site, rec, settings.seed))
            initial.update({n: values[n].clone() for n in names})
        params = [values[n].to(device).clone().requires_grad_(True) for n in names]
        opt = torch.optim.Adam(params, lr=settings.lr)
        if resume and index == position["layer_index"] and position["step"] > 0:
            restore_adam(opt, names, saved)
        key = f"attention_transfer.layer{lp.layer}"
        start = position["step"] if index == position["layer_index"] else 0
        check = max(1, settings.steps // 8)
        if held_rows and start == 0:  # the starting values are the first candidate
            first = _finite(_held_transfer(rec, held_mine, lp, site, params), f"layer {lp.layer} (held-out rows)", -1,
                            settings.lr)
            track.clear()
            track.update(loss=first, first=first)
            best.clear()
            best.update({n: values[n].clone() for n in names})
        for step in range(start, settings.steps):
            rows = _mine(_rows(settings.seed, 1, lp.layer, step, train_rows, settings.batch))
            opt.zero_grad(set_to_none=True)
            value = _finite(_transfer_step(rec, rows, lp, site, params), f"layer {lp.layer}", step, settings.lr)
            _finite_grads(names, params, step, settings.lr)
            opt.step()
            losses.setdefault(key, [value, value])[1] = value
            for n, p in zip(names, params):
                values[n] = p.detach().cpu().clone()
            if held_rows and ((step + 1) % check == 0 or step + 1 == settings.steps):
                held = _finite(_held_transfer(rec, held_mine, lp, site, params), f"layer {lp.layer} (held-out rows)",
                               step, settings.lr)
                if held < track["loss"]:
                    track["loss"] = held
                    best.update({n: values[n].clone() for n in names})
            position.update(layer_index=index, step=step + 1)
            if (step + 1) % settings.save_every == 0:
                checkpoint(opt, names)
            if progress is not None:
                progress(f"layer {lp.layer}", step + 1, settings.steps, value)
        if held_rows:  # the best values the held-out rows saw (the starting ones included)
            values.update({n: best[n].clone() for n in names})
            losses[f"held_out_transfer.layer{lp.layer}"] = [track["first"], track["loss"]]
        position.update(layer_index=index + 1, step=0)
        checkpoint(None, [])

    # stage 1: attention transfer, layer by layer, in one sweep (one layer's activations at a time)
    todo = {lp.layer for i, lp in enumerate(layers) if position["stage"] == 1 and i >= position["layer_index"]}
    if records is not None:
        for layer in sorted(todo):
            train_layer(layer, records[layer])
    elif todo:
        sweep_records(runner, local, todo, train_layer)
    teacher = Teacher(runner, local) if held_rows or settings.e2e_steps else None

    def judge(candidate: dict[str, Tensor]) -> float:
        """The held-out end-to-end KL per position of ``candidate`` (all processes)."""
        assert teacher is not None
        total, count = held_out_kl(runner, plan, {n: t.to(device) for n, t in candidate.items()}, param_name, teacher,
                                   local, held_mine)
        sums = distributed.sum_arrays({"kl": np.array([total, count], dtype=np.float64)})["kl"]
        kl = float(sums[0] / max(sums[1], 1.0))
        if not math.isfinite(kl):  # each process checked its own rows; this is another process's
            raise DistillError(f"distillation stopped: the held-out KL is {kl}", hint=STUDENT_HINT)
        return kl

    if held_rows and position["stage"] == 1:  # which values stage 2 starts from, and the result without it
        after = judge(values)
        start_kl = judge(initial)
        held_out.update(rows=len(held_rows), initial=round(start_kl, 6), attention_transfer=round(after, 6))
        kept, kl = ("initial", start_kl) if start_kl < after else ("attention_transfer", after)
        if kept == "initial":
            values = {n: t.clone() for n, t in initial.items()}
        held_out.update(kept=kept, kept_kl=round(kl, 6))
        best.clear()
        best.update({n: t.clone() for n, t in values.items()})
    # stage 2: end-to-end KL on the model's outputs
    if settings.e2e_steps:
        names = sorted(values)
        params = {n: values[n].to(device).clone().requires_grad_(True) for n in names}
        opt = torch.optim.Adam(list(params.values()), lr=settings.e2e_lr)
        start = position["step"] if position["stage"] == 2 else 0
        if resume and position["stage"] == 2 and start > 0:
            restore_adam(opt, names, saved)
        position.update(stage=2, step=start)
        assert teacher is not None
        check = max(1, settings.e2e_steps // 5)
        for step in range(start, settings.e2e_steps):
            drawn = _rows(settings.seed, 2, 0, step, train_rows, settings.batch)
            tokens = len(drawn) * calibration.seq_len
            opt.zero_grad(set_to_none=True)
            mine = _mine(drawn)
            local_sum = kl_step(runner, plan, params, param_name, teacher, local, mine, tokens) if mine else 0.0
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
            for p, gr in zip(params.values(), grads):
                p.grad = gr
            distributed.sum_tensors(grads)
            total = distributed.sum_arrays({"kl": np.array([local_sum])})["kl"][0]
            value = _finite_value(float(total) / tokens, "end to end", step, settings.e2e_lr)
            _finite_grads(names, [params[n] for n in names], step, settings.e2e_lr)
            opt.step()
            losses.setdefault("kl", [value, value])[1] = value
            for n, p in params.items():
                values[n] = p.detach().cpu().clone()
            if held_rows and ((step + 1) % check == 0 or step + 1 == settings.e2e_steps):
                now = judge(values)
                held_out.setdefault("end_to_end", []).append([step + 1, round(now, 6)])
                if now < held_out["kept_kl"]:
                    held_out.update(kept=f"end_to_end step {step + 1}", kept_kl=round(now, 6))
                    best.clear()
                    best.update({n: t.clone() for n, t in values.items()})
            position.update(step=step + 1)
            if (step + 1) % settings.save_every == 0:
                checkpoint(opt, names)
            if progress is not None:
                progress("end to end", step + 1, settings.e2e_steps, value)
    if held_rows:
        values = {n: t.clone() for n, t in best.items()}
    return DistillResult(values, settings, {k: [round(v, 6) for v in pair] for k, pair in losses.items()}, dict(held_out))


def _state_fingerprint(extra: str, settings: DistillSettings, plan: Plan, calibration: Calibration) -> str:
    return fingerprint(extra, settings, plan, calibration)


def _finite(value: float, where: str, step: int, lr: float) -> float:
    return _finite_value(value, where, step, lr)


def _finite_grads(names: list[str], params: list[Tensor], step: int, lr: float) -> None:
    """Every gradient must be finite before the optimizer applies it: name the first parameter whose is not."""
    for name, p in zip(names, params):
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            raise DistillError(
                f"distillation diverged: step {step + 1}: the gradient of {name} is not finite",
                hint=f"lower the learning rate (it was {lr:g})",
            )


def _finite_value(value: float, where: str, step: int, lr: float) -> float:
    if not math.isfinite(value):
        raise DistillError(
            f"distillation diverged: {where}, step {step + 1}: the loss is {value}",
            hint=f"lower the learning rate (it was {lr:g})",
        )
    return value
