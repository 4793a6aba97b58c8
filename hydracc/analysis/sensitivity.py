"""How much each unit matters: estimates from one backward sweep, exact values by re-running from a layer.

Design decisions:
- A unit (a KV group under GQA, else a head) is scored by making its heads linear (in the
  scored kind, on the original q, k, v) with everything else unchanged. Two measures:
  ``kl``, the mean over calibration positions of KL(original || variant) of the next-token
  distribution, and ``recall``, the change of the mean cross-entropy of the true next token at
  recall positions (``recall_positions``: the current and the next token occurred together
  earlier in the row, so the next one is predictable by copying).
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

import numpy as np
import torch

from hydracc import distributed
from hydracc.analysis.head import compare, draw
from hydracc.analysis.layerwise import Runner, Sweep, load_head, release, suffix_hidden

RunScored = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``run(q, k, v, scale) -> out``: the scored kind on heads' q, k, v (GQA expanded), fp32."""

EXACT_GROUP = 16
"""Candidates re-measured together (their hidden states are held at once)."""


def recall_positions(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: position ``t < T-1`` whose next token is predictable by copying, i.e. the
    pair ``(tokens[t], tokens[t+1])`` occurred at some earlier ``s < t``."""
    b, t = tokens.shape
    out = torch.zeros(b, t, dtype=torch.bool, device=tokens.device)
    if t < 3:
        return out
    pairs = tokens[:, :-1].long() * (int(tokens.max()) + 1) + tokens[:, 1:].long()  # [B, T-1]
    earlier = torch.ones(t - 1, t - 1, dtype=torch.bool, device=tokens.device).tril(-1)
    out[:, :-1] = ((pairs[:, :, None] == pairs[:, None, :]) & earlier).any(-1)
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
    scales: dict[int, float],
    run_scored: RunScored,
    *,
    fisher_samples: int = 2,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> Estimates:
    """One backward sweep per loss (``fisher_samples`` draws for the KL, one for recall)."""
    g = runner.graph
    names = [f"fisher{i}" for i in range(fisher_samples)] + ["recall"]
    kl = {layer: np.zeros(len(u)) for layer, u in units.items()}
    recall = {layer: np.zeros(len(u)) for layer, u in units.items()}
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
                    lin = run_scored(q.detach().float(), k.detach().float(), v.detach().float(), scales[site_layer])
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
                        if name == "recall":
                            recall[layer] += per_unit.sum(0)
                        else:
                            kl[layer] += 0.5 * (per_unit**2).sum(0)
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
    positions = sum(info.real * info.ids.shape[1] for info in batches)
    total = distributed.sum_arrays({**{("kl", k): v for k, v in kl.items()}, **{("recall", k): v for k, v in recall.items()},
                                    ("n", "positions"): np.array([positions]), ("n", "recall"): np.array([n_recall])})
    positions, n_recall = int(total[("n", "positions")][0]), int(total[("n", "recall")][0])
    kl = {k: total[("kl", k)] / (max(fisher_samples, 1) * max(positions, 1)) for k in kl}
    recall = {k: total[("recall", k)] / max(n_recall, 1) for k in recall}
    return Estimates(kl, recall, n_recall)


@dataclass
class Exact:
    kl: float
    recall: float
    """Change of the mean cross-entropy at recall positions (0 when there are none)."""


def measure(
    runner: Runner,
    sweep: Sweep,
    batches: Sequence[BatchInfo],
    candidates: Sequence[Sequence[tuple[int, Sequence[int]]]],
    scales: dict[int, float],
    run_scored: RunScored,
    *,
    progress: Callable[[], None] | None = None,
) -> list[Exact]:
    """Exact ``kl`` and ``recall`` for each candidate: a list of ``(layer, heads)`` made linear together."""
    results: list[Exact] = []
    for start in range(0, len(candidates), EXACT_GROUP):
        results += _measure_group(runner, sweep, batches, candidates[start : start + EXACT_GROUP], scales, run_scored,
                                  progress)
    return results


def _measure_group(runner: Runner, sweep: Sweep, batches: Sequence[BatchInfo],
                   candidates: Sequence[Sequence[tuple[int, Sequence[int]]]], scales: dict[int, float],
                   run_scored: RunScored, progress: Callable[[], None] | None) -> list[Exact]:
    g = runner.graph
    heads = [{layer: list(h) for layer, h in cand} for cand in candidates]
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
                    lin = run_scored(q.index_select(1, idx).float(), k.index_select(1, idx).float(),
                                     v.index_select(1, idx).float(), scales[site_layer])
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
        kl = np.zeros(len(candidates))
        ce = np.zeros(len(candidates))
        positions = n_recall = 0
        for bi, info in enumerate(batches):
            def flat(env: dict, _real=info.real, _weights=weights) -> torch.Tensor:
                h = suffix_hidden(runner, _weights, {k: env[k] for k in g.suffix.value_keys})[:_real]
                return h.reshape(-1, h.shape[-1])

            base = flat(sweep.boundaries[g.suffix.index][bi])
            variants = [flat(state[bi]) for state in states if state is not None]
            mask = info.recall.to(base.device).reshape(-1)
            nxt = torch.cat([info.ids[: info.real, 1:], info.ids[: info.real, :1]], 1).to(base.device).reshape(-1)
            cmp = compare(head, base, variants, nxt)
            kl += cmp.kl.double().sum(-1).cpu().numpy()
            ce += ((cmp.ce[1:] - cmp.ce[:1]) * mask).double().sum(-1).cpu().numpy()
            positions += base.shape[0]
            n_recall += int(mask.sum())
            del base, variants, cmp
        del weights, head
        release(runner.device)
        if progress is not None:
            progress()
    total = distributed.sum_arrays({"kl": kl, "ce": ce, "n": np.array([positions, n_recall], dtype=np.float64)})
    kl, ce = total["kl"], total["ce"]
    positions, n_recall = int(total["n"][0]), int(total["n"][1])
    return [Exact(kl[c] / max(positions, 1), ce[c] / n_recall if n_recall else 0.0) for c in range(len(candidates))]
