"""Distill stage: initialise and train what conversion added (fusion scales, feature maps, gates).

Design decisions:
- Training runs on the captured, *unrewritten* graph in original head order, like analysis:
  an ``fx.Interpreter`` stops at each attention site. Values are keyed by checkpoint name
  (``{module}.hydra.{name}``, rows per original query head); emit reorders their rows with
  the same edits as the q/k/v/o weights, so this stage never reads the rewritten graph.
- Initialisation (``initial_params``) is measured on calibration data from the original
  heads: fusion scale = the head's mean output RMS (linear outputs are normalized, then
  brought to the original head's scale); hedgehog ``W`` = ``sqrt(scale) * N(0, 1)`` (the
  softmax feature map with Gaussian weights is a positive-random-feature estimate of
  ``exp(scale q.k)``, so the head starts near the softmax it replaces), ``b`` = 0; gdn gate
  weights 0 with the decay bias set from the head's mean attention distance ``d``
  (``alpha = 1 - 1 / (d + 1)``) and step size ``beta = 0.5``. Seeded per layer and head.
- Stage 1, attention transfer: one layer at a time, each linear head's fused output is
  fitted to the original head's output on recorded q, k, v (relative MSE, Adam). Each
  layer's q, k, v and output are recorded just before it trains (the graph runs up to that
  site only), so memory is one layer's activations on the calibration rows (fp32, CPU) plus
  its training state; layers are independent.
- Stage 2 (optional): KL(original || converted) of the next-token distribution, end to
  end, training only the added parameters of every layer together.
- Deterministic: minibatches are drawn from a generator seeded by (seed, stage, layer,
  step), so a resumed run draws what an uninterrupted one would. One state file (parameters,
  Adam moments; position, losses and fingerprint in its metadata) is replaced atomically every
  ``save_every`` steps and at each layer's end, next to the output
  (``OUT.hydracc-distill/state.safetensors``); ``resume=True`` continues from it when the
  fingerprint (inputs, plan, calibration tokens, training settings except the save interval
  and device) matches and refuses otherwise. It is deleted after a successful conversion.
- A non-finite loss stops training with an error instead of emitting broken parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from hydracc.analysis.calibration import Calibration
from hydracc.analysis.scores import SiteInterpreter, calibration_batches, graph_logits, site_qkv
from hydracc.errors import HydraError
from hydracc.frontend.capture import AttentionSite, CapturedModel
from hydracc.kernels.kinds import PARAM_NAMES, kind_by_name, param_shapes
from hydracc.kernels.naive import fuse_linear_output, hybrid_attention_reference, run_kind
from hydracc.planning.plan import LayerPlan, Plan

Progress = Callable[[str, int, int, float], None]
"""``progress(stage_label, step, steps, loss)`` after every training step."""


class DistillError(HydraError):
    """Distillation cannot start or resume."""


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 200
    """Attention-transfer steps per layer (stage 1)."""
    e2e_steps: int = 0
    """End-to-end KL steps (stage 2); 0 skips it."""
    lr: float = 1e-2
    e2e_lr: float = 1e-3
    batch: int = 8
    seed: int = 0
    save_every: int = 50
    device: str | None = None
    """Where to train: ``None`` picks CUDA when available, else CPU."""

    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def __post_init__(self) -> None:
        if self.steps < 0 or self.e2e_steps < 0:
            raise DistillError(f"--steps and --e2e-steps must be >= 0, got {self.steps} and {self.e2e_steps}")
        if not (self.lr > 0 and self.e2e_lr > 0):
            raise DistillError(f"learning rates must be positive, got {self.lr} and {self.e2e_lr}")
        if self.batch < 1 or self.save_every < 1:
            raise DistillError("--distill-batch and the save interval must be >= 1")


@dataclass
class SiteRecord:
    """One layer's attention inputs and original output on the calibration rows (fp32, CPU)."""

    q: Tensor  # [N, Hq, T, D]
    k: Tensor  # [N, Hkv, T, D]
    v: Tensor  # [N, Hkv, T, Dv]
    out: Tensor  # [N, Hq, T, Dv]


@dataclass
class DistillResult:
    values: dict[str, Tensor]
    """Checkpoint name -> tensor, rows in original head order."""
    settings: DistillSettings | None
    losses: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What the ``hydra`` section keeps about the training."""
        return {"settings": asdict(self.settings) if self.settings else None, "losses": self.losses}


def param_name(site: AttentionSite, name: str) -> str:
    return f"{site.module}.hydra.{name}"


def _batches(captured: CapturedModel, calibration: Calibration) -> list[tuple[Tensor, int]]:
    """Calibration rows in graph-sized batches (``analyze.calibration_batches``), as a list."""
    return list(calibration_batches(calibration, captured.input_shape[0]))


class _Recorded(Exception):
    """Raised by the recording hook once every wanted site of a batch is recorded."""


def record_sites(
    captured: CapturedModel, weights: dict[str, Tensor], calibration: Calibration, layers: set[int]
) -> dict[int, SiteRecord]:
    """Run the original graph over ``calibration``; keep q, k, v and output of the ``layers``' sites."""
    sites = {s.layer: s for s in captured.sites}
    device = next(iter(weights.values())).device
    gm = captured.graph_on(device)
    parts: dict[int, list[tuple[Tensor, ...]]] = {layer: [] for layer in layers}
    for ids, real in _batches(captured, calibration):
        pending = set(layers)

        def hook(layer: int, target: Any, args: tuple, kwargs: dict, _real: int = real, _pending: set = pending) -> Tensor:
            out = target(*args, **kwargs)
            if layer in parts:
                q, k, v = site_qkv(args, kwargs)
                group = q.shape[1] // sites[layer].num_kv_heads
                k, v = k[:, ::group] if k.shape[1] == q.shape[1] else k, v[:, ::group] if v.shape[1] == q.shape[1] else v
                parts[layer].append(tuple(t[:_real].detach().float().cpu() for t in (q, k, v, out)))
                _pending.discard(layer)
                if not _pending:
                    raise _Recorded  # nothing after this site is needed
            return out

        try:
            with torch.no_grad():
                SiteInterpreter(gm, hook).run(*captured.graph_inputs(weights, ids.to(device)))
        except _Recorded:
            pass
    return {layer: SiteRecord(*(torch.cat(ts) for ts in zip(*chunks))) for layer, chunks in parts.items()}


def _mean_distance(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Per head: mean attended distance ``t - p`` under causal softmax. q ``[N, H, T, D]``, k per head."""
    t = q.shape[2]
    pos = torch.arange(t, dtype=torch.float32)
    dist = (pos[:, None] - pos[None, :]).clamp_min(0)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    out = []
    for h in range(q.shape[1]):
        scores = (q[:, h] @ k[:, h].transpose(-1, -2)) * scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out.append(float((probs * dist).sum(-1).mean()))
    return torch.tensor(out)


def initial_params(plan: Plan, sites: list[AttentionSite], records: dict[int, SiteRecord], seed: int = 0) -> dict[str, Tensor]:
    """Starting values of every layer's learned parameters (see the module docstring)."""
    by_layer = {s.layer: s for s in sites}
    values: dict[str, Tensor] = {}
    for lp in plan.layers:
        if plan.layer_has_params(lp):
            values.update(layer_initial_params(lp, by_layer[lp.layer], records[lp.layer], seed))
    return values


def initial_values(
    captured: CapturedModel, weights: dict[str, Tensor], plan: Plan, calibration: Calibration, seed: int = 0
) -> dict[str, Tensor]:
    """``initial_params`` measured one layer at a time (memory: one layer's recorded activations)."""
    values: dict[str, Tensor] = {}
    for lp in plan.layers:
        if plan.layer_has_params(lp):
            rec = record_sites(captured, weights, calibration, {lp.layer})[lp.layer]
            values.update(layer_initial_params(lp, captured.site(lp.layer), rec, seed))
    return values


def layer_initial_params(lp: LayerPlan, site: AttentionSite, rec: SiteRecord, seed: int = 0) -> dict[str, Tensor]:
    """Starting values of one layer's learned parameters, measured on its recorded activations."""
    hq, d = site.num_heads, site.head_dim
    group = hq // site.num_kv_heads
    shapes = param_shapes(hq, d)
    init = {name: torch.zeros(shape) for name, shape in shapes.items()}
    rms = rec.out.pow(2).mean(-1).sqrt().mean(dim=(0, 2))  # [Hq]
    init["fusion_scale"] = rms.clamp_min(1e-4)
    distance = _mean_distance(rec.q, rec.k.repeat_interleave(group, dim=1), site.scale)
    for h, head in enumerate(lp.heads):
        kind = kind_by_name(head.kind)
        if kind.init_params is not None:  # the kind's own rule (hydracc.kernels.kinds.<kind>)
            gen = torch.Generator().manual_seed(_seed(seed, lp.layer, h))
            kind.init_params(init, h, d, scale=site.scale, distance=float(distance[h]), generator=gen)
    return {param_name(site, name): init[name] for name in PARAM_NAMES}


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rows(seed: int, stage: int, layer: int, step: int, n: int, batch: int) -> Tensor:
    gen = torch.Generator().manual_seed(_seed(seed, stage, layer, step))
    return torch.randperm(n, generator=gen)[: min(batch, n)]


def _layer_params(values: dict[str, Tensor], site: AttentionSite) -> dict[str, Tensor]:
    return {name: values[param_name(site, name)] for name in PARAM_NAMES}


def transfer_loss(rec: SiteRecord, rows: Tensor, lp: LayerPlan, site: AttentionSite, params: dict[str, Tensor]) -> Tensor:
    """Mean over the layer's linear heads of ``|fused - original|^2 / |original|^2`` on ``rows``."""
    group = site.num_heads // site.num_kv_heads
    device = next(iter(params.values())).device
    losses = []
    for code in sorted({kind_by_name(h.kind).code for h in lp.heads if kind_by_name(h.kind).linear}):
        heads = torch.tensor([h for h, hp in enumerate(lp.heads) if kind_by_name(hp.kind).code == code])
        q = rec.q[rows].index_select(1, heads).to(device)
        k = rec.k[rows].index_select(1, heads // group).to(device)
        v = rec.v[rows].index_select(1, heads // group).to(device)
        target = rec.out[rows].index_select(1, heads).to(device)
        selected = {name: t.index_select(0, heads.to(device)) for name, t in params.items()}
        out = fuse_linear_output(run_kind(code, q, k, v, site.scale, params=selected), selected["fusion_scale"])
        err = (out - target).pow(2).mean(dim=(0, 2, 3)) / target.pow(2).mean(dim=(0, 2, 3)).clamp_min(1e-12)
        losses.append(err)
    return torch.cat(losses).mean()


class _State:
    """The resumable training state in one file: tensors, with position and fingerprint as metadata."""

    FILE = "state.safetensors"

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir = directory
        self.fingerprint = fingerprint

    def save(self, values: dict[str, Tensor], optimizer: torch.optim.Adam | None, names: list[str], position: dict[str, Any]) -> None:
        tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in values.items()}
        if optimizer is not None:
            for name, p in zip(names, optimizer.param_groups[0]["params"]):
                st = optimizer.state.get(p)
                if st:
                    tensors[f"adam/{name}/exp_avg"] = st["exp_avg"].cpu().contiguous()
                    tensors[f"adam/{name}/exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                    tensors[f"adam/{name}/step"] = torch.as_tensor(float(st["step"]), dtype=torch.float64).reshape(1)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (self.FILE + ".tmp")
        meta = {"hydracc_distill": json.dumps({"fingerprint": self.fingerprint, **position})}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.dir / self.FILE)  # one rename: the position always matches the tensors

    def load(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        path = self.dir / self.FILE
        if not path.is_file():
            raise DistillError(
                f"--resume: no distillation state in {self.dir}",
                hint="run without --resume to start over (a state is first saved after --save-every steps)",
            )
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("hydracc_distill")
        meta = json.loads(raw) if raw else {}
        if meta.get("fingerprint") != self.fingerprint:
            raise DistillError(
                f"--resume: the state in {self.dir} was written for other inputs or settings",
                hint="rerun with the same checkpoint, plan, calibration and distill options, or without --resume to start over",
            )
        return meta, load_file(str(path))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _restore_adam(optimizer: torch.optim.Adam, names: list[str], tensors: dict[str, Tensor]) -> None:
    for name, p in zip(names, optimizer.param_groups[0]["params"]):
        if f"adam/{name}/exp_avg" in tensors:
            optimizer.state[p] = {
                "step": torch.tensor(float(tensors[f"adam/{name}/step"][0])),
                "exp_avg": tensors[f"adam/{name}/exp_avg"].to(p.device).clone(),
                "exp_avg_sq": tensors[f"adam/{name}/exp_avg_sq"].to(p.device).clone(),
            }


def state_dir_for(out: str | os.PathLike[str]) -> Path:
    """Where the resumable distillation state of a conversion to ``out`` lives."""
    p = Path(out)
    return p.parent / f"{p.name}.hydracc-distill"


def distill(
    captured: CapturedModel,
    weights: dict[str, Tensor],
    plan: Plan,
    calibration: Calibration,
    settings: DistillSettings,
    *,
    state_dir: Path | None = None,
    fingerprint: str = "",
    resume: bool = False,
    progress: Progress | None = None,
    records: dict[int, SiteRecord] | None = None,
) -> DistillResult:
    """Initialise and train the plan's added parameters; returns values in original head order.

    Trains on the device of ``weights``; recorded activations stay on the CPU and move a
    minibatch at a time; returned values are on the CPU.
    """
    sites = {s.layer: s for s in captured.sites}
    device = next(iter(weights.values())).device
    layers = [lp for lp in plan.layers if plan.layer_has_params(lp)]
    state = _State(state_dir, _fingerprint(fingerprint, settings, plan, calibration)) if state_dir is not None else None
    position: dict[str, Any] = {"stage": 1, "layer_index": 0, "step": 0, "losses": {}}
    values: dict[str, Tensor] = {}
    saved: dict[str, Tensor] = {}
    if resume:
        if state is None:
            raise DistillError("--resume needs a state directory")
        position, saved = state.load()
        values = {k.removeprefix("param/"): t.clone() for k, t in saved.items() if k.startswith("param/")}
    losses: dict[str, Any] = position.get("losses", {})

    def checkpoint(opt: torch.optim.Adam | None, names: list[str]) -> None:
        if state is not None:
            state.save(values, opt, names, {**position, "losses": losses})

    # stage 1: attention transfer, layer by layer (activations recorded for one layer at a time)
    for index, lp in enumerate(layers):
        if position["stage"] > 1 or index < position["layer_index"]:
            continue
        site = sites[lp.layer]
        rec = records[lp.layer] if records is not None else record_sites(captured, weights, calibration, {lp.layer})[lp.layer]
        names = [param_name(site, n) for n in PARAM_NAMES]
        if names[0] not in values:
            values.update(layer_initial_params(lp, site, rec, settings.seed))
        params = [values[n].to(device).clone().requires_grad_(True) for n in names]
        opt = torch.optim.Adam(params, lr=settings.lr)
        if resume and index == position["layer_index"] and position["step"] > 0:
            _restore_adam(opt, names, saved)
        key = f"attention_transfer.layer{lp.layer}"
        start = position["step"] if index == position["layer_index"] else 0
        for step in range(start, settings.steps):
            rows = _rows(settings.seed, 1, lp.layer, step, rec.q.shape[0], settings.batch)
            loss = transfer_loss(rec, rows, lp, site, dict(zip(PARAM_NAMES, params)))
            value = _finite(loss, f"layer {lp.layer}", step, settings.lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.setdefault(key, [value, value])[1] = value
            for n, p in zip(names, params):
                values[n] = p.detach().cpu().clone()
            position.update(layer_index=index, step=step + 1)
            if (step + 1) % settings.save_every == 0:
                checkpoint(opt, names)
            if progress is not None:
                progress(f"layer {lp.layer}", step + 1, settings.steps, value)
        del rec
        position.update(layer_index=index + 1, step=0)
        checkpoint(None, [])
    # stage 2: end-to-end KL on the model's outputs
    if settings.e2e_steps:
        names = sorted(values)
        params = [values[n].to(device).clone().requires_grad_(True) for n in names]
        opt = torch.optim.Adam(params, lr=settings.e2e_lr)
        start = position["step"] if position["stage"] == 2 else 0
        if resume and position["stage"] == 2 and start > 0:
            _restore_adam(opt, names, saved)
        position.update(stage=2)
        batches = _batches(captured, calibration)
        gm = captured.graph_on(device)
        for step in range(start, settings.e2e_steps):
            ids, real = batches[int(_rows(settings.seed, 2, 0, step, len(batches), 1)[0])]
            loss = _kl_loss(captured, weights, plan, dict(zip(names, params)), ids, real, gm)
            value = _finite(loss, "end to end", step, settings.e2e_lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.setdefault("kl", [value, value])[1] = value
            for n, p in zip(names, params):
                values[n] = p.detach().cpu().clone()
            position.update(step=step + 1)
            if (step + 1) % settings.save_every == 0:
                checkpoint(opt, names)
            if progress is not None:
                progress("end to end", step + 1, settings.e2e_steps, value)
    return DistillResult(values, settings, {k: [round(v, 6) for v in pair] for k, pair in losses.items()})


def _fingerprint(extra: str, settings: DistillSettings, plan: Plan, calibration: Calibration) -> str:
    """What a saved state must match to be resumed: inputs, plan, calibration tokens, settings."""
    trained = {k: v for k, v in asdict(settings).items() if k not in ("save_every", "device")}
    doc = {"inputs": extra, "settings": trained, "plan": plan.to_json(),
           "calibration": hashlib.sha256(calibration.tokens.astype("int64").tobytes()).hexdigest(),
           "shape": list(calibration.tokens.shape)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _finite(loss: Tensor, where: str, step: int, lr: float) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise DistillError(
            f"distillation diverged: {where}, step {step + 1}: the loss is {value}",
            hint=f"lower the learning rate (it was {lr:g})",
        )
    return value


def _kl_loss(
    captured: CapturedModel, weights: dict[str, Tensor], plan: Plan, values: dict[str, Tensor], ids: Tensor, real: int,
    gm: torch.fx.GraphModule | None = None,
) -> Tensor:
    """KL(original || converted) of the next-token distribution, mean over tokens of the real rows."""
    sites = {s.layer: s for s in captured.sites}
    device = next(iter(weights.values())).device
    gm = gm if gm is not None else captured.graph_on(device)
    inputs = captured.graph_inputs(weights, ids.to(device))
    with torch.no_grad():
        teacher = graph_logits(gm(*inputs))[:real].float()

    def hook(layer: int, target: Any, args: tuple, kwargs: dict) -> Tensor:
        q, k, v = site_qkv(args, kwargs)
        lp, site = plan.layer(layer), sites[layer]
        codes = [kind_by_name(h.kind).code for h in lp.heads]
        params = [values[param_name(site, n)] for n in PARAM_NAMES] if plan.layer_has_params(lp) else []
        if all(c == 0 for c in codes):
            return target(*args, **kwargs)
        return hybrid_attention_reference(q, k, v, codes, site.scale, params, head_windows=lp.head_windows())

    student = graph_logits(SiteInterpreter(gm, hook).run(*inputs))[:real].float()
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="none").sum(-1).mean()
