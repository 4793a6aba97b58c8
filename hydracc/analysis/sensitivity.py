"""How much each unit matters: estimates from one backward sweep, exact values by re-running from a layer.

Design decisions:
- A unit (a KV group under GQA, else a head) is scored by making its heads linear (in the
  scored kind, on the original q, k, v) with everything else unchanged. Two measures:
  ``kl``, the mean over calibration positions of KL(original || variant) of the next-token
  distribution, and ``recall``, the change of the mean cross-entropy of the true next token at
  recall positions: where the next token is predictable only by copying from earlier context,
  found two ways. ``recall_positions``: the current and the next token occurred together
  earlier in the row (induction, MQAR). ``window_recall``: the model itself, run once more
  with every head limited to its last ``FAR`` tokens (plus a 4-token sink), gives the true next
  token at least 4x less probability than with its whole context: a value recalled across a
  gap, whatever the format around it (``<get> k <out> v``). One extra forward pass.
- Estimates, linear in depth (attribution patching): with ``d`` the unit's output change at
  its site and ``g`` a loss's gradient at the site output, ``recall ~ sum g.d`` (first order:
  the cross-entropy's gradient is not zero at the original model) and ``kl ~ 1/2 E[(sum_t
  g_t.d_t)^2]`` with ``g_t`` the gradient of ``log p(y_t)`` for ``y_t`` drawn from the original
  model's own next-token distribution (the Fisher quadratic form; the KL's first order is
  zero). Draws at different positions are independent, so one backward pass of their summed
  log-likelihood gives every position's term; rows are squared separately. Each loss costs
  one backward pass, run layer by layer from the hidden states the forward sweep kept
  (gradient checkpointing at layer boundaries), so memory is one layer's autograd graph.
- Exact values: the layers from a candidate's first layer to the logits run again with its
  units replaced, starting from the kept hidden states; candidates run layer-major together
  (a layer's weights are read once for all of them), ``EXACT_GROUP`` at a time.
- The LM head runs in vocabulary chunks (``head.py``): no loss here ever holds a full
  ``[positions, vocab]`` logits tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hydracc import distributed
from hydracc.analysis.head import compare, draw
from hydracc.analysis.layerwise import (
    NonFiniteError,
    Runner,
    Sweep,
    forward_sweep,
    load_head,
    release,
    suffix_hidden,
)

RunScored = Callable[[int, list[int], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``run(layer, heads, q, k, v) -> out``: what those query heads of ``layer`` compute once converted
(the scored kind, with its starting parameters and fusion where the plan has them), on their
q, k, v (GQA expanded, fp32)."""

EXACT_GROUP = 16
"""Candidates re-measured together (their hidden states are held at once)."""


FAR = 32
"""Recall reaches further back than this: the window of the local model ``window_recall`` compares against."""
GAIN = 1.3862943611198906
"""ln 4: the far context makes the true next token at least 4x more likely (``window_recall``)."""


def check_original_logits(values: torch.Tensor) -> None:
    """``values`` computed from the original model's logits (its log-partition, cross-entropies, maxima) must
    be finite: the hidden states were (``forward_sweep``), so the final norm or the LM head is not."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(
            "the original model's logits are not finite (after its last layer: final norm, LM head)",
            hint="check the final norm and LM head (lm_head, or the tied embeddings) weights in the checkpoint",
        )


def recall_positions(tokens: torch.Tensor, far: int = 0) -> torch.Tensor:
    """``[B, T]`` bool: positions ``t < T-1`` whose next token is predictable by copying, i.e. the
    pair ``(tokens[t], tokens[t+1])`` occurred at some earlier ``s < t`` (induction, MQAR's
    ``k v ... k v``), and, with ``far``, not since ``t - far`` (copied from beyond a local window:
    a pair repeated nearby is predictable without recall). ``window_recall`` adds the positions
    that need far context in any format."""
    b, t = tokens.shape
    out = torch.zeros(b, t, dtype=torch.bool, device=tokens.device)
    if t < 3:
        return out
    pairs = tokens[:, :-1].long() * (int(tokens.max()) + 1) + tokens[:, 1:].long()  # [B, T-1]
    index = torch.arange(t - 1, device=tokens.device)
    earlier = index[None, :] < index[:, None]  # [t, s]: s < t
    same = (pairs[:, :, None] == pairs[:, None, :]) & earlier
    if far:
        near = index[None, :] > index[:, None] - far  # s within the last ``far`` positions
        out[:, :-1] = same.any(-1) & ~(same & near).any(-1)
    else:
        out[:, :-1] = same.any(-1)
    return out


def expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if k.shape[1] != q.shape[1]:  # SDPA called with enable_gqa: expand here
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return q, k, v


@dataclass
class BatchInfo:
    """What the losses need of one calibration batch."""

    ids: torch.Tensor
    real: int
    recall: torch.Tensor
    """``[real, T]`` bool, ``recall_positions`` of the real rows."""


@dataclass
class Estimates:
    """Per layer, per unit: the two estimates (see the module docstring)."""

    kl: dict[int, np.ndarray]
    recall: dict[int, np.ndarray]
    recall_positions: int
    kl_rows: dict[int, np.ndarray] | None = None
    """Per layer, ``[rows, units]``: each calibration row's sum of the KL estimate (all rows, all processes)."""
    recall_rows: dict[int, np.ndarray] | None = None
    """Per layer, ``[rows, units]``: each row's sum of the recall estimate."""


def row_weights(batches: Sequence[BatchInfo], n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per calibration row (all processes): its positions and its recall positions, the
    denominators that turn per-row sums into means over any resample of rows."""
    positions = np.concatenate([np.full(b.real, b.ids.shape[1], dtype=np.float64) for b in batches]) if batches else np.zeros(0)
    recall = np.concatenate([b.recall.sum(1).double().numpy() for b in batches]) if batches else np.zeros(0)
    return distributed.gather_rows(positions, n_rows), distributed.gather_rows(recall, n_rows)


def _site_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = args[0] if len(args) > 0 else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    return q, k, v


def _leaves(env: dict) -> dict:
    """``env`` with every floating tensor detached into a leaf that requires grad."""
    return {key: v.detach().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for key, v in env.items()}


def estimate(
    runner: Runner,
    sweep: Sweep,
    batches: Sequence[BatchInfo],
    units: dict[int, list[list[int]]],
    run_scored: RunScored,
    *,
    fisher_samples: int = 2,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> Estimates:
    """One backward sweep per loss (``fisher_samples`` draws for the KL, one for recall)."""
    g = runner.graph
    names = [f"fisher{i}" for i in range(fisher_samples)] + ["recall"]
    kl = {layer: np.zeros((sum(b.real for b in batches), len(u))) for layer, u in units.items()}  # per row
    recall = {layer: np.zeros((sum(b.real for b in batches), len(u))) for layer, u in units.items()}
    first_row = np.cumsum([0] + [b.real for b in batches])
    # grads[b][loss][key]: the loss's gradient at a value key, for the segment that produced it
    grads: list[dict[str, dict[str, torch.Tensor]]] = [{n: {} for n in names} for _ in batches]
    n_recall = 0
    weights, head = load_head(runner)
    for bi, (info, env) in enumerate(zip(batches, sweep.boundaries[g.suffix.index])):
        leaves = _leaves(env)
        keys = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        with torch.enable_grad():
            hidden = suffix_hidden(runner, weights, leaves)[: info.real]
            flat = hidden.reshape(-1, hidden.shape[-1])
            with torch.no_grad():
                gen = torch.Generator(device=flat.device).manual_seed(seed * 1_000_003 + bi)
                d = draw(head, flat.detach(), fisher_samples, gen)
                check_original_logits(d.lse)
                out_grads = {f"fisher{i}": head.rows(y) - d.expected for i, y in enumerate(d.samples)}  # d log p(y) / dh
                mask = info.recall.to(flat.device).reshape(-1)
                n_recall += int(mask.sum())
                if mask.any():
                    nxt = torch.cat([info.ids[: info.real, 1:], info.ids[: info.real, :1]], 1).to(flat.device).reshape(-1)
                    out_grads["recall"] = -mask[:, None].float() * (head.rows(nxt) - d.expected)  # d CE / dh at recall positions
                del d
            for i, name in enumerate(n for n in names if n in out_grads):
                last = i == len(out_grads) - 1
                got = torch.autograd.grad(flat, [leaves[k] for k in keys], out_grads[name].to(flat.dtype),
                                          retain_graph=not last, allow_unused=True)
                grads[bi][name] = {k: gr for k, gr in zip(keys, got) if gr is not None}
        del hidden, flat, out_grads
    del weights, head
    release(runner.device)
    if progress is not None:
        progress()
    for seg in reversed(g.layers):
        weights = runner.load(seg)
        layer = seg.layer
        assert layer is not None
        for bi, (info, env) in enumerate(zip(batches, sweep.boundaries[seg.index])):
            needed = {name: [grads[bi][name].get(k) for k in seg.outputs] for name in names}
            active = [n for n in names if any(x is not None for x in needed[n])]
            site: dict[str, torch.Tensor] = {}

            def hook(site_layer: int, target, args: tuple, kwargs: dict, _site=site) -> torch.Tensor:
                out = target(*args, **kwargs)
                q, k, v = expand_kv(*_site_args(args, kwargs))
                with torch.no_grad():
                    lin = run_scored(site_layer, list(range(q.shape[1])), q.detach().float(), k.detach().float(),
                                     v.detach().float())
                    _site["delta"] = (lin - out.detach().float())
                _site["out"] = out
                return out

            leaves = _leaves(env)
            with torch.enable_grad():
                outs = runner.call(seg, weights, leaves, hook=hook)
                keys = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
                new: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
                for i, name in enumerate(active):
                    pairs = [(o, gr) for o, gr in zip(outs, needed[name]) if gr is not None]
                    got = torch.autograd.grad([o for o, _ in pairs], [site["out"]] + [leaves[k] for k in keys],
                                              [gr for _, gr in pairs], retain_graph=i < len(active) - 1, allow_unused=True)
                    g_site = got[0]
                    if g_site is not None:
                        per_head = (g_site[: info.real].float() * site["delta"][: info.real]).sum((2, 3)).double()  # [rows, H]
                        per_unit = torch.stack([per_head[:, u].sum(1) for u in units[layer]], 1).cpu().numpy()  # [rows, U]
                        rows = slice(first_row[bi], first_row[bi + 1])
                        if name == "recall":
                            recall[layer][rows] += per_unit
                        else:
                            kl[layer][rows] += 0.5 * per_unit**2 / max(fisher_samples, 1)
                    new[name] = {k: gr for k, gr in zip(keys, got[1:]) if gr is not None}
            for name in names:  # this segment's outputs are consumed; its inputs' gradients replace them
                for k in seg.outputs:
                    grads[bi][name].pop(k, None)
                for k, gr in new[name].items():
                    grads[bi][name][k] = grads[bi][name][k] + gr if k in grads[bi][name] else gr
            site.clear()
        del weights
        release(runner.device)
        if progress is not None:
            progress()
    n_rows = int(distributed.sum_arrays({"n": np.array([first_row[-1]], dtype=np.float64)})["n"][0])
    kl_rows = {k: distributed.gather_rows(v, n_rows) for k, v in kl.items()}
    recall_rows = {k: distributed.gather_rows(v, n_rows) for k, v in recall.items()}
    positions, recall_counts = row_weights(batches, n_rows)
    n_recall = int(recall_counts.sum())
    kl = {k: v.sum(0) / max(positions.sum(), 1) for k, v in kl_rows.items()}
    recall = {k: v.sum(0) / max(n_recall, 1) for k, v in recall_rows.items()}
    return Estimates(kl, recall, n_recall, kl_rows, recall_rows)


def recall_accuracy(runner: Runner, sweep: Sweep, batches: Sequence[BatchInfo]) -> tuple[int, int]:
    """How many recall positions the original model predicts (argmax), and how many there are (all processes)."""
    g = runner.graph
    weights, head = load_head(runner)
    right = total = 0
    with torch.no_grad():
        for info, env in zip(batches, sweep.boundaries[g.suffix.index]):
            mask = info.recall.reshape(-1)
            if not mask.any():
                continue
            h = suffix_hidden(runner, weights, env)[: info.real]
            flat = h.reshape(-1, h.shape[-1])[mask.to(h.device)]
            nxt = torch.cat([info.ids[: info.real, 1:], info.ids[: info.real, :1]], 1).reshape(-1)[mask].to(flat.device)
            best = torch.full((flat.shape[0],), float("-inf"), device=flat.device)
            arg = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
            for v0, _v1, (z,) in head.chunks([flat]):
                value, index = z.float().max(-1)
                check_original_logits(value)
                better = value > best
                best, arg = torch.where(better, value, best), torch.where(better, index + v0, arg)
            right += int((arg == nxt).sum())
            total += int(mask.sum())
    del weights, head
    release(runner.device)
    counts = distributed.sum_arrays({"n": np.array([right, total], dtype=np.float64)})["n"]
    return int(counts[0]), int(counts[1])


@dataclass
class Exact:
    kl: float
    recall: float
    """Change of the mean cross-entropy at recall positions (0 when there are none)."""
    kl_rows: np.ndarray | None = None
    """Per calibration row (all processes): the sum of the KL over its positions."""
    ce_rows: np.ndarray | None = None
    """Per row: the sum of the cross-entropy change over its recall positions."""


def measure(
    runner: Runner,
    sweep: Sweep,
    batches: Sequence[BatchInfo],
    candidates: Sequence[Sequence[tuple[int, Sequence[int]]]],
    run_scored: RunScored,
    *,
    progress: Callable[[], None] | None = None,
) -> list[Exact]:
    """Exact ``kl`` and ``recall`` for each candidate: a list of ``(layer, heads)`` made linear together."""
    results: list[Exact] = []
    for start in range(0, len(candidates), EXACT_GROUP):
        results += _measure_group(runner, sweep, batches, candidates[start : start + EXACT_GROUP], run_scored, progress)
    return results


def _measure_group(runner: Runner, sweep: Sweep, batches: Sequence[BatchInfo],
                   candidates: Sequence[Sequence[tuple[int, Sequence[int]]]], run_scored: RunScored,
                   progress: Callable[[], None] | None) -> list[Exact]:
    g = runner.graph
    heads: list[dict[int, list[int]]] = []
    for cand in candidates:  # a configuration may make several units of one layer linear
        per_layer: dict[int, list[int]] = {}
        for layer, h in cand:
            per_layer.setdefault(layer, []).extend(int(x) for x in h)
        heads.append({layer: sorted(set(h)) for layer, h in per_layer.items()})
    first = [g.layer(min(c)).index for c in heads]
    states: list[list[dict] | None] = [None] * len(candidates)
    with torch.no_grad():
        for seg in g.layers:
            live = [c for c in range(len(candidates)) if first[c] <= seg.index]
            if not live:
                continue
            weights = runner.load(seg)
            for c in live:
                if states[c] is None:
                    states[c] = [dict(env) for env in sweep.boundaries[seg.index]]
                replace = heads[c].get(seg.layer)

                def hook(site_layer: int, target, args: tuple, kwargs: dict, _heads=replace) -> torch.Tensor:
                    out = target(*args, **kwargs)
                    if not _heads:
                        return out
                    q, k, v = expand_kv(*_site_args(args, kwargs))
                    idx = torch.tensor(_heads, device=q.device)
                    lin = run_scored(site_layer, list(_heads), q.index_select(1, idx).float(), k.index_select(1, idx).float(),
                                     v.index_select(1, idx).float())
                    return out.index_copy(1, idx, lin.to(out.dtype))

                for env in states[c]:
                    env.update(zip(seg.outputs, runner.call(seg, weights, env, hook=hook)))
                    for key in [k for k in env if g.last_use.get(k, -1) <= seg.index]:
                        del env[key]  # read by no later segment
            del weights
            release(runner.device)
            if progress is not None:
                progress()
        weights, head = load_head(runner)
        kl_parts: list[np.ndarray] = []  # per batch, [candidates, rows]
        ce_parts: list[np.ndarray] = []
        for bi, info in enumerate(batches):
            def flat(env: dict, _real=info.real, _weights=weights) -> torch.Tensor:
                h = suffix_hidden(runner, _weights, {k: env[k] for k in g.suffix.value_keys})[:_real]
                return h.reshape(-1, h.shape[-1])

            base = flat(sweep.boundaries[g.suffix.index][bi])
            variants = [flat(state[bi]) for state in states if state is not None]
            mask = info.recall.to(base.device).reshape(-1)
            nxt = torch.cat([info.ids[: info.real, 1:], info.ids[: info.real, :1]], 1).to(base.device).reshape(-1)
            cmp = compare(head, base, variants, nxt)
            check_original_logits(cmp.ce[0])
            n_var = len(variants)
            kl_parts.append(cmp.kl.double().reshape(n_var, info.real, -1).sum(-1).cpu().numpy())
            ce_parts.append(((cmp.ce[1:] - cmp.ce[:1]) * mask).double().reshape(n_var, info.real, -1).sum(-1).cpu().numpy())
            del base, variants, cmp
        del weights, head
        release(runner.device)
        if progress is not None:
            progress()
    local = sum(b.real for b in batches)
    n_rows = int(distributed.sum_arrays({"n": np.array([local], dtype=np.float64)})["n"][0])
    kl_rows = distributed.gather_rows(np.concatenate(kl_parts, 1).T if kl_parts else np.zeros((0, len(candidates))), n_rows)
    ce_rows = distributed.gather_rows(np.concatenate(ce_parts, 1).T if ce_parts else np.zeros((0, len(candidates))), n_rows)
    positions, recall_counts = row_weights(batches, n_rows)
    n_recall = recall_counts.sum()
    return [Exact(kl_rows[:, c].sum() / max(positions.sum(), 1), ce_rows[:, c].sum() / n_recall if n_recall else 0.0,
                  kl_rows[:, c], ce_rows[:, c]) for c in range(len(candidates))]


def window_recall(runner: Runner, sweep: Sweep, batches: Sequence[BatchInfo], scales: dict[int, float],
                  far: int = FAR, gain: float = GAIN) -> int:
    """Add to each batch's ``recall`` the positions whose true next token the original predicts with at
    least ``exp(gain)`` times more probability than the same model with every head limited to a
    4-token sink and its last ``far`` tokens (see the module docstring); returns how many it added."""
    from hydracc.kernels.kinds import kind_by_name
    from hydracc.kernels.naive import run_kind

    code = kind_by_name("streaming").code
    g = runner.graph

    def local(site_layer: int, target: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        q, k, v = expand_kv(*_site_args(args, kwargs))
        out = run_kind(code, q.float(), k.float(), v.float(), scales[site_layer], None, sink=4, window=far)
        return out.to(q.dtype)

    narrow = forward_sweep(runner, [b.ids for b in batches], local, keep=False,
                           model=f"the original model limited to its last {far} tokens")
    weights, head = load_head(runner)
    added = 0
    with torch.no_grad():
        for info, base_env, env in zip(batches, sweep.boundaries[g.suffix.index], narrow.envs):
            base = suffix_hidden(runner, weights, base_env)[: info.real]
            flat = base.reshape(-1, base.shape[-1])
            near = suffix_hidden(runner, weights, env)[: info.real].reshape(-1, base.shape[-1])
            nxt = torch.cat([info.ids[: info.real, 1:], info.ids[: info.real, :1]], 1).reshape(-1).to(flat.device)
            ce = compare(head, flat, [near], nxt).ce
            mask = (ce[1] - ce[0] >= gain).reshape(info.real, -1).cpu()
            mask[:, -1] = False  # the last position has no next token in the row
            added += int((mask & ~info.recall).sum())
            info.recall = info.recall | mask
    del weights, head, narrow
    release(runner.device)
    return added
