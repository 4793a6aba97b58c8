"""Analyze stage: run calibration data through the captured graph and score every head.

Design decisions:
- The captured, not yet rewritten, graph runs one layer at a time (``layerwise``: weights read
  from the checkpoint when their layer runs), stopping at each attention site (the SDPA node
  marked by capture) to score its heads; nothing of the model is re-implemented, so any
  family capture accepts can be analyzed. The graph is captured at ``[batch, seq_len]``.
- Per query head, from its attention probabilities on the calibration rows: ``retrieval``
  (attention mass on positions right after an earlier occurrence of the current token, minus
  what a uniform head would put there: the induction / copy pattern of the Retrieval Head
  literature; 1 for a perfect copier, about 0 for uniform), ``distance`` (mean attended
  distance in tokens), ``sink`` (mass on the first token), ``entropy`` (normalized by
  ``log(position + 1)``, so 1 is uniform), and ``linear_error`` (relative L2 error of the
  linear kind's output on the same q, k, v).
- Per unit (the KV group under grouped-query attention, since only whole groups free cache;
  the head otherwise), with the unit made linear and everything else unchanged
  (``sensitivity.py``): ``sensitivity``, the KL of the next-token distribution, mean over
  calibration positions, and ``recall``, the change of the cross-entropy at positions whose
  next token is predictable by copying. ``method``: ``exact`` re-runs the layers after each
  unit (cost grows with layers x units); ``estimate`` takes one backward sweep per loss
  (linear in depth); ``auto`` (default) ranks by the estimates and re-measures exactly the
  ``exact_k`` units nearest the budget's cut line (``cut``), all of them when there are no more
  (on larger models the window narrows to what ``JOINT_RUNS`` forward passes can settle).
  Every head of a unit carries the unit's values.
- Per-head sums are added up in float64 across batches; the same inputs and batch size give
  the same scores. Attention probabilities are computed one head at a time (memory
  ``[batch, T, T]``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from hydracc import distributed
from hydracc.analysis.calibration import Calibration, local_rows
from hydracc.analysis.initial import initial_layer_params
from hydracc.analysis.layerwise import (
    NonFiniteError,
    Runner,
    Segment,
    compute_dtype,
    forward_sweep,
    nonfinite_kind,
    split_by_layer,
)
from hydracc.analysis.sensitivity import (
    FAR,
    BatchInfo,
    estimate,
    expand_kv,
    measure,
    recall_accuracy,
    recall_positions,
    row_weights,
    window_recall,
)
from hydracc.frontend.capture import SITE_META, AttentionSite, CapturedModel
from hydracc.kernels.kinds import FUSION_PARAM, kind_by_name
from hydracc.kernels.naive import fuse_linear_output, run_kind

SCORE_NAMES = ("retrieval", "distance", "sink", "entropy", "linear_error", "sensitivity", "recall")
METHODS = ("auto", "estimate", "exact")
EXACT_K = 8
"""Units re-measured exactly around the cut line by ``method="auto"``."""
JOINT_RUNS = 8
"""On a model with more units than ``exact_k``, the most configurations the joint elimination may
measure (each costs about one forward pass over the calibration rows, since units ranked below
the window are linear in every one): the window narrows until its elimination fits (4 units,
2 each side of the cut: 4 + 3 runs)."""


@dataclass
class HeadScores:
    retrieval: float = 0.0
    distance: float = 0.0
    sink: float = 0.0
    entropy: float = 0.0
    linear_error: float = 0.0
    sensitivity: float = 0.0
    recall: float = 0.0
    priority: float = 0.0
    """The unit's place in the keep-first order the analysis settled on (0 = first)."""

    def to_json(self, digits: int = 6) -> dict[str, float]:
        return {k: round(float(v), digits) for k, v in asdict(self).items()}


@dataclass
class LayerScores:
    layer: int
    module: str
    num_heads: int
    num_kv_heads: int
    heads: list[HeadScores]
    unit_sensitivity: list[float]
    """The KL that ranks units, per unit: per KV group under GQA, per head otherwise."""
    unit_recall: list[float] = field(default_factory=list)
    """Change of the cross-entropy at recall positions, per unit (exact where measured)."""
    unit_kl_estimate: list[float | None] = field(default_factory=list)
    unit_kl_exact: list[float | None] = field(default_factory=list)
    unit_recall_estimate: list[float | None] = field(default_factory=list)
    unit_priority: list[int] = field(default_factory=list)
    """Per unit, its place in the keep-first order (objective ranking, joint re-measurement)."""
    unit_decided_by: list[str] = field(default_factory=list)
    """Per unit, what placed it: ``recall``, ``kl`` or ``joint`` (the re-measurement at the cut line)."""

    @property
    def grouped(self) -> bool:
        return self.num_kv_heads < self.num_heads


@dataclass
class Analysis:
    layers: list[LayerScores]
    calibration: dict[str, Any]
    linear_kind: str
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)

    def layer(self, index: int) -> LayerScores:
        for ls in self.layers:
            if ls.layer == index:
                return ls
        raise KeyError(index)

    def to_json(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration,
            "linear_kind": self.linear_kind,
            **self.extra,
            "unit": self.unit,
            "layers": [
                {
                    "layer": ls.layer,
                    "module": ls.module,
                    "num_heads": ls.num_heads,
                    "num_kv_heads": ls.num_kv_heads,
                    "unit_sensitivity": [round(x, 6) for x in ls.unit_sensitivity],
                    "unit_recall": [round(x, 6) for x in ls.unit_recall],
                    "unit_kl_estimate": [None if x is None else round(x, 6) for x in ls.unit_kl_estimate],
                    "unit_kl_exact": [None if x is None else round(x, 6) for x in ls.unit_kl_exact],
                    "unit_recall_estimate": [None if x is None else round(x, 6) for x in ls.unit_recall_estimate],
                    "unit_priority": ls.unit_priority,
                    "unit_decided_by": ls.unit_decided_by,
                    "heads": [h.to_json() for h in ls.heads],
                }
                for ls in self.layers
            ],
        }


class SiteInterpreter(fx.Interpreter):
    """Runs the graph, sending every attention site through ``hook(layer, target, args, kwargs)``."""

    def __init__(self, gm: fx.GraphModule, hook: Callable[[int, Any, tuple, dict], torch.Tensor]) -> None:
        super().__init__(gm)
        self.hook = hook

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_function" and n.meta.get(SITE_META) is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self.hook(n.meta[SITE_META], n.target, args, kwargs)
        return super().run_node(n)


def site_qkv(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k, v an attention site's SDPA call received (positionally or by keyword)."""
    q = args[0] if len(args) > 0 else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    return q, k, v


def calibration_batches(calibration: Calibration, batch: int) -> Iterator[tuple[torch.Tensor, int]]:
    """``(ids [batch, seq_len], real)`` per graph run: a short last batch is padded with repeated
    rows, of which only the first ``real`` count (rows do not interact, so padding changes nothing)."""
    seq_len = calibration.seq_len
    for start in range(0, calibration.samples, batch):
        rows = calibration.tokens[start : start + batch]
        real = len(rows)
        if real < batch:
            rows = np.concatenate([rows, np.resize(calibration.tokens, (batch - real, seq_len))])
        yield torch.from_numpy(np.ascontiguousarray(rows)).long(), real


def graph_logits(out: Any) -> torch.Tensor:
    """The logits from a captured graph's output (a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def retrieval_targets(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T, T]`` bool: key position p is a copy target for query t (p < t, token[p-1] == token[t])."""
    b, t = tokens.shape
    prev = torch.cat([tokens.new_full((b, 1), -1), tokens[:, :-1]], dim=1)  # token before each key position
    match = tokens[:, :, None] == prev[:, None, :]
    return match & torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril(-1)


class _Accumulator:
    """Per-head sums over calibration samples (float64)."""

    def __init__(self, heads: int) -> None:
        self.sums = {name: np.zeros(heads) for name in ("retrieval", "distance", "sink", "entropy", "rms")}
        self.counts = {name: 0.0 for name in self.sums}
        self.err_num = np.zeros(heads)
        self.err_den = np.zeros(heads)

    def add(
        self, probs: torch.Tensor, targets: torch.Tensor, sdpa_out: torch.Tensor, linear_out: torch.Tensor, first: int = 0
    ) -> None:
        """probs ``[B, h, T, T]`` fp32 (causal) for heads ``first .. first+h``, targets ``[B, T, T]``, outputs ``[B, h, T, Dv]``."""
        b, h, t, _ = probs.shape
        sl = slice(first, first + h)
        pos = torch.arange(t, dtype=torch.float32)
        dist = (pos[:, None] - pos[None, :]).clamp(min=0)
        self.sums["distance"][sl] += (probs * dist).sum(-1).sum((0, 2)).double().numpy()
        if first == 0:  # counts are per position, the same for every head
            self.counts["distance"] += b * t
        self.sums["sink"][sl] += probs[..., 0].sum((0, 2)).double().numpy()
        if first == 0:
            self.counts["sink"] += b * t
        self.sums["rms"][sl] += sdpa_out.float().pow(2).mean(-1).sqrt().double().sum((0, 2)).numpy()
        if first == 0:
            self.counts["rms"] += b * t
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [B, H, T]
        norm = (pos + 1).log()
        self.sums["entropy"][sl] += (ent[..., 1:] / norm[1:]).sum((0, 2)).double().numpy()
        if first == 0:
            self.counts["entropy"] += b * (t - 1)
        tf = targets.float()
        n_targets = tf.sum(-1)  # [B, T]
        valid = n_targets > 0
        mass = (probs * tf[:, None]).sum(-1)  # [B, H, T]
        excess = mass - (n_targets / (pos + 1))[:, None]
        self.sums["retrieval"][sl] += (excess * valid[:, None]).sum((0, 2)).double().numpy()
        if first == 0:
            self.counts["retrieval"] += float(valid.sum())
        so, lo = sdpa_out.float(), linear_out.float()
        self.err_num[sl] += ((lo - so).double() ** 2).sum((0, 2, 3)).numpy()
        self.err_den[sl] += (so.double() ** 2).sum((0, 2, 3)).numpy()

    def reduce(self) -> None:
        """Add every process's sums together (torch.distributed; a no-op alone)."""
        arrays = {f"sum.{k}": v for k, v in self.sums.items()}
        arrays.update({f"count.{k}": np.array([v]) for k, v in self.counts.items()})
        arrays.update({"err_num": self.err_num, "err_den": self.err_den})
        total = distributed.sum_arrays(arrays)
        self.sums = {k: total[f"sum.{k}"] for k in self.sums}
        self.counts = {k: float(total[f"count.{k}"][0]) for k in self.counts}
        self.err_num, self.err_den = total["err_num"], total["err_den"]

    def rms(self) -> np.ndarray:
        """Per head, the mean RMS of the original output (the fusion scale it starts from)."""
        return self.sums["rms"] / max(self.counts["rms"], 1.0)

    def distance(self) -> np.ndarray:
        """Per head, the mean attended distance."""
        return self.sums["distance"] / max(self.counts["distance"], 1.0)

    def scores(self) -> list[HeadScores]:
        mean = {k: self.sums[k] / max(self.counts[k], 1.0) for k in self.sums}
        err = np.sqrt(self.err_num / np.maximum(self.err_den, 1e-30))
        return [
            HeadScores(
                retrieval=float(mean["retrieval"][i]),
                distance=float(mean["distance"][i]),
                sink=float(mean["sink"][i]),
                entropy=float(mean["entropy"][i]),
                linear_error=float(err[i]),
            )
            for i in range(len(err))
        ]


def _causal_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    t = q.shape[2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


_SCORED_HINT = ("the original model's values there are finite, so the {kind} kind's computation overflows on them: "
                "try another --linear-kind, or analyze in float32 (on the CPU); if the checkpoint's weights there are "
                "extreme, check them")


def _check_site(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """The original attention at ``layer`` must be finite: name the query heads whose q, k, v or output is not."""
    bad = ~torch.isfinite(out).flatten(2).all(-1).all(0)  # [H]
    if not bool(bad.any()):
        return
    heads = bad.nonzero().flatten().tolist()
    inputs = [name for name, t in (("q", q), ("k", k), ("v", v)) if not bool(torch.isfinite(t).all())]
    source = (f"its {'/'.join(inputs)} projections are already {nonfinite_kind(torch.cat([t.flatten() for t in (q, k, v)]))}"
              if inputs else "its attention probabilities overflow (q.k too large)")
    raise NonFiniteError(
        f"the original model's outputs are {nonfinite_kind(out)} at layer {layer}, attention heads "
        f"{', '.join(map(str, heads))} ({source})",
        hint=f"check layer {layer}'s attention weights (q/k/v projections, their norms) in the checkpoint, and rope_theta "
        "/ rope_scaling (rope_parameters) in config.json",
        layer=layer,
    )


def _check_head_scores(layer: int, heads: list[HeadScores], units: list[list[int]], kind: str) -> None:
    """Every per-head score must be finite (the forward sweep's values were, so a NaN here is the scored kind's)."""
    for h, scores in enumerate(heads):
        for name, value in asdict(scores).items():
            if not math.isfinite(value):
                u = next(i for i, members in enumerate(units) if h in members)
                raise NonFiniteError(
                    f"the analysis computed a non-finite {name} ({value}) at layer {layer}, head {h} (unit {layer}.{units[u][0]})",
                    hint=_SCORED_HINT.format(kind=kind), layer=layer,
                )


def _check_unit(layer: int, u: int, members: list[int], kl: float, recall: float, kind: str, how: str) -> None:
    """A unit's KL and recall change must be finite."""
    for name, value in (("KL", kl), ("recall change", recall)):
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the analysis {how} a non-finite {name} ({value}) for layer {layer}, unit {layer}.{members[0]} "
                f"(heads {', '.join(map(str, members))}) made {kind}",
                hint=_SCORED_HINT.format(kind=kind), layer=layer,
            )


def units_of(site: AttentionSite) -> list[list[int]]:
    """The planning units of a site: its KV groups under GQA, its single heads otherwise."""
    if site.num_kv_heads < site.num_heads:
        g = site.num_heads // site.num_kv_heads
        return [list(range(u * g, (u + 1) * g)) for u in range(site.num_kv_heads)]
    return [[h] for h in range(site.num_heads)]


def analyze(
    captured: CapturedModel,
    weights: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
    calibration: Calibration,
    *,
    linear_kind: str = "elu",
    kind_params: dict[str, int] | None = None,
    fusion: bool = False,
    sensitivity: bool = True,
    method: str = "auto",
    objective: str = "recall",
    cut: int | None = None,
    exact_k: int = EXACT_K,
    fisher_samples: int = 2,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Score every head of every attention site of ``captured`` on ``calibration``.

    ``captured`` must have been captured at ``[batch, calibration.seq_len]``. ``weights`` maps the
    model's parameter names to tensors, or reads one by name (read when its layer runs, so memory
    follows a layer). The rows run ``batch`` at a time; a short last batch is padded with repeated
    rows that are not counted. Units are scored as ``linear_kind`` heads would run once converted:
    hedgehog and gdn at their measured starting values (``analysis.initial``), with
    scale-normalized fusion when ``fusion`` (always for learned kinds), streaming with its window.
    ``sensitivity=False`` skips the per-unit measures. ``method``, ``objective``, ``cut`` (units
    the plan will keep full; default a quarter) and ``exact_k``: see the module docstring and
    ``select.py``. ``device``: where to compute (default: the weights' device, else the CPU);
    ``dtype``: default float32 on the CPU, else the weights' floating dtype.
    """
    from hydracc.analysis import select

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if objective not in select.OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(select.OBJECTIVES)}, got {objective!r}")
    kind = kind_by_name(linear_kind)
    if kind.keeps_kv:
        raise ValueError(f"linear_kind must be a kind that frees the KV cache, got {linear_kind!r}")
    fused = fusion or kind.learned
    window = {**kind.plan_defaults, **{k: int(v) for k, v in (kind_params or {}).items() if k in kind.plan_params}}
    layer_params: dict[int, dict[str, torch.Tensor]] = {}
    """Per layer, the starting ``head_params`` (every head of ``kind``), once the forward sweep measured them."""

    def run_scored(layer: int, heads: list[int], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        params = layer_params.get(layer)
        rows = None
        if params is not None:
            idx = torch.tensor(heads)
            rows = {name: t.index_select(0, idx).to(q.device) for name, t in params.items()}
        out = run_kind(kind.code, q, k, v, scales[layer], rows, **window)
        if fused and rows is not None:
            out = fuse_linear_output(out, rows[FUSION_PARAM])
        return out

    batch, seq_len = captured.input_shape
    if calibration.seq_len != seq_len:
        raise ValueError(f"graph captured for length {seq_len}, calibration rows have {calibration.seq_len}")
    if isinstance(weights, Mapping):
        table = weights
        read: Callable[[str], torch.Tensor] = table.__getitem__
        dtypes = [t.dtype for t in table.values()]
        dev = torch.device(device) if device is not None else next(iter(table.values())).device
    else:
        read, dtypes = weights, []
        dev = torch.device(device) if device is not None else torch.device("cpu")
    runner = Runner(split_by_layer(captured, captured.graph_on(dev)), captured, read, dev,
                    dtype or compute_dtype(dev, dtypes))
    sites = {s.layer: s for s in captured.sites}
    scales = {layer: s.scale for layer, s in sites.items()}
    acc = {layer: _Accumulator(s.num_heads) for layer, s in sites.items()}
    units = {layer: units_of(s) for layer, s in sites.items()}
    mine = local_rows(calibration)  # under torch.distributed: this process's rows; the sums are added up below
    batches = [BatchInfo(ids, real, recall_positions(ids[:real], far=FAR)) for ids, real in calibration_batches(mine, batch)]
    n_layers = len(runner.graph.layers)
    order = [(layer, u) for layer in sorted(units) for u in range(len(units[layer]))]
    total_units = len(order)
    exact_all = method == "exact" or (method == "auto" and total_units <= exact_k)
    at = round(0.25 * total_units) if cut is None else max(0, min(int(cut), total_units))
    def window_at(k: int) -> tuple[int, int, int]:  # first unit of the window, units it keeps, configurations
        lo = max(0, min(at - k // 2, total_units - k))
        keep = max(0, min(at - lo, k))
        return lo, keep, sum(k - j for j in range(k - keep))

    k = min(exact_k, total_units) if method != "estimate" else 0
    while not exact_all and k > 2 and window_at(k)[2] > JOINT_RUNS:
        k -= 1
    lo, keep, joint_runs = window_at(k)
    steps = [n_layers + 2 + bool(sensitivity)]  # forward sweep: prefix and layers; windowed pass; recall accuracy
    if sensitivity:
        steps.append((n_layers + 1) * math.ceil(total_units / 16) if exact_all else n_layers + 1)
        steps.append((n_layers + 1) * sum(math.ceil((k - j) / 16) for j in range(k - keep)))
    total, done = sum(steps), 0

    def step(_: Segment | None = None) -> None:
        nonlocal done
        done = min(done + 1, total)
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    current: list[int] = [0]

    def score_hook(layer: int, target: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        out = target(*args, **kwargs)
        info = batches[current[0] % len(batches)]
        real = info.real
        q, k, v = expand_kv(*site_qkv(args, kwargs))
        _check_site(layer, q[:real], k[:real], v[:real], out[:real])
        q, k, v = q[:real].float(), k[:real].float(), v[:real].float()
        # linear_error: learned kinds' starting values need this very pass's statistics, so they are measured as elu
        lin = run_kind(kind_by_name("elu").code if kind.learned else kind.code, q, k, v, scales[layer], None, **window)
        targets = retrieval_targets(info.ids[:real].to(q.device)).cpu()
        for h in range(q.shape[1]):  # one head at a time: memory is [B, T, T], not [B, H, T, T]
            probs = _causal_probs(q[:, h : h + 1], k[:, h : h + 1], scales[layer])
            acc[layer].add(probs.cpu(), targets, out[:real, h : h + 1].float().cpu(), lin[:, h : h + 1].float().cpu(),
                           first=h)
        current[0] += 1
        return out

    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    sweep = forward_sweep(runner, [b.ids for b in batches], score_hook, keep=bool(sensitivity), on_segment=step)
    for a in acc.values():
        a.reduce()
    for layer in sorted(acc):
        _check_head_scores(layer, acc[layer].scores(), units[layer], kind.name)
    if kind.learned or fused:  # the starting values the converted heads will have
        for layer, site in sites.items():
            stats = acc[layer]
            layer_params[layer] = initial_layer_params([kind.name] * site.num_heads, site.head_dim, site.scale,
                                                       torch.from_numpy(stats.rms()), torch.from_numpy(stats.distance()),
                                                       layer, seed)
    seconds["forward"] = time.perf_counter() - clock
    kl_est: dict[int, np.ndarray] = {}
    rec_est: dict[int, np.ndarray] = {}
    exact_kl: dict[tuple[int, int], float] = {}
    exact_recall: dict[tuple[int, int], float] = {}
    by_pairs = int(distributed.sum_arrays({"n": np.array([sum(int(b.recall.sum()) for b in batches)])})["n"][0])
    if sensitivity:  # positions that need far context in any format: the model against itself with a local window
        window_recall(runner, sweep, batches, scales)
        step()
    right, n_recall = recall_accuracy(runner, sweep, batches) if sensitivity else (0, 0)
    step()
    objective_info: dict[str, Any] = {}
    priority: dict[tuple[int, int], int] = {}
    decided: dict[tuple[int, int], str] = {}
    if sensitivity:
        clock = time.perf_counter()
        n_rows = calibration.samples
        positions, recall_counts = row_weights(batches, n_rows)
        rows = select.Rows(positions, recall_counts, {}, {})
        if exact_all:
            found = measure(runner, sweep, batches, [[(layer, units[layer][u])] for layer, u in order], run_scored,
                            progress=step)
            for lu, ex in zip(order, found):
                exact_kl[lu], exact_recall[lu] = ex.kl, ex.recall
                rows.unit_kl[lu], rows.unit_recall[lu] = ex.kl_rows, ex.ce_rows
            kl_of, recall_of = dict(exact_kl), dict(exact_recall)
            seconds["exact"] = time.perf_counter() - clock
        else:
            est = estimate(runner, sweep, batches, units, run_scored, fisher_samples=fisher_samples, seed=seed, progress=step)
            kl_est, rec_est = est.kl, est.recall
            kl_of = {(layer, u): float(kl_est[layer][u]) for layer, u in order}
            recall_of = {(layer, u): float(rec_est[layer][u]) for layer, u in order}
            for layer, u in order:
                rows.unit_kl[(layer, u)] = est.kl_rows[layer][:, u]
                rows.unit_recall[(layer, u)] = est.recall_rows[layer][:, u]
            seconds["estimate"] = time.perf_counter() - clock
        for layer, u in order:
            _check_unit(layer, u, units[layer][u], kl_of[(layer, u)], recall_of[(layer, u)], kind.name,
                        "measured" if exact_all else "estimated")
        accuracy = right / n_recall if n_recall else 0.0
        ranking = select.rank(order, kl_of, recall_of, objective, accuracy, n_recall)
        joint = None
        window_units = ranking.order[lo : lo + k]
        if k and method != "estimate":
            clock = time.perf_counter()
            use_recall = ranking.objective == "recall" and ranking.fell_back is None

            def joint_loss(configs: list[list[tuple[int, int]]], _sweep: Any = sweep) -> list[float]:
                found = measure(runner, _sweep, batches,
                                [[(layer, units[layer][u]) for layer, u in sorted(c)] for c in configs], run_scored,
                                progress=step)
                for c, ex in zip(configs, found):
                    if not (math.isfinite(ex.kl) and math.isfinite(ex.recall)):
                        layer, u = sorted(c)[0]
                        _check_unit(layer, u, units[layer][u], ex.kl, ex.recall, kind.name,
                                    f"measured with {len(c)} units linear together")
                    rows.configurations[tuple(sorted(c))] = (ex.kl_rows, ex.ce_rows)
                return [(ex.recall, ex.kl) if use_recall else (ex.kl, ex.kl) for ex in found]

            joint = select.eliminate(window_units, ranking.order[lo + k :], keep, joint_loss)
            seconds["joint"] = time.perf_counter() - clock
        final, decided = select.priority(ranking, window_units, joint)
        priority = {lu: i for i, lu in enumerate(final)}

        def label(lu: select.Unit) -> str:  # a unit by its first query head, as plans and --keep-full name it
            return f"{lu[0]}.{units[lu[0]][lu[1]][0]}"

        sure = select.stability(ranking, final, at, rows, window=window_units if joint is not None else (),
                                elimination=joint, use_recall=ranking.objective == "recall" and ranking.fell_back is None,
                                accuracy=accuracy, seed=seed, name=label)
        objective_info = {
            "name": ranking.objective, "fell_back_to_kl": ranking.fell_back, "original_recall_accuracy": round(accuracy, 6),
            "recall_positions": n_recall, "recall_positions_by_pairs": by_pairs, "cut": at, "stability": sure.to_json(),
            "joint": None if joint is None else {
                "window": [label(lu) for lu in window_units], "kept": [label(lu) for lu in joint.kept],
                "removed": [label(lu) for lu in joint.removed], "configurations": joint.runs,
                "loss_when_removed": {label(lu): [round(v, 6) for v in c] for lu, c in joint.costs.items()},
            },
        }
    del sweep
    layers = []
    for layer in sorted(sites):
        site = sites[layer]
        heads = acc[layer].scores()
        n = len(units[layer])
        unit_kl = [kl_of[(layer, u)] for u in range(n)] if sensitivity else [0.0] * n
        unit_recall = [recall_of[(layer, u)] for u in range(n)] if sensitivity else [0.0] * n
        for u, members in enumerate(units[layer]):
            for h in members:
                heads[h].sensitivity = unit_kl[u]
                heads[h].recall = unit_recall[u]
                heads[h].priority = float(priority.get((layer, u), 0))
        layers.append(LayerScores(
            layer, site.module, site.num_heads, site.num_kv_heads, heads, unit_kl, unit_recall,
            [float(kl_est[layer][u]) if layer in kl_est else None for u in range(n)],
            [exact_kl.get((layer, u)) for u in range(n)],
            [float(rec_est[layer][u]) if layer in rec_est else None for u in range(n)],
            [priority.get((layer, u), u) for u in range(n)],
            [decided.get((layer, u), "") for u in range(n)],
        ))
    grouped = any(s.num_kv_heads < s.num_heads for s in sites.values())
    extra: dict[str, Any] = {"scored_as": kind.name, **window, **({"fusion": True} if fused else {})}
    if sensitivity:
        extra["sensitivity"] = {
            "method": "exact" if exact_all else method, "exact_units": len(exact_kl), "total_units": total_units,
            "joint_configurations": joint_runs if method != "estimate" else 0,
            "recall_positions": n_recall, "device": str(dev), "dtype": str(runner.dtype).removeprefix("torch."),
            "seconds": {k: round(v, 2) for k, v in seconds.items()}, "weight_reads": runner.weight_reads,
            "peak_layer_bytes": runner.peak_segment_bytes,
            **({"fisher_samples": fisher_samples} if not exact_all else {}),
        }
        extra["objective"] = objective_info
    return Analysis(layers, calibration.describe(), kind.name, "kv_group" if grouped else "head", extra)
