"""Distill stage 2: KL(original || converted) end to end, one layer at a time.

Design decisions:
- The teacher (the original model) runs once over this process's rows and keeps only its final
  hidden states (``[rows, T, H]``); the LM head in vocabulary chunks (``analysis.head``) turns
  them into what the KL and its gradient need, so no ``[positions, vocab]`` logits are held.
- A step: the student (the original graph with each converted layer's attention replaced by
  the hybrid reference with the current parameters) runs forward layer by layer without
  autograd, keeping each layer's input; the mean KL's gradient at the student's final hidden
  state is ``(E_q[W] - E_p[W]) / tokens`` per position; each layer then runs again with autograd
  from its kept input (gradient checkpointing at layer boundaries), passing the gradient back
  and adding the parameters' gradients. Memory: one layer's autograd graph; weights are read
  as their layer runs, twice per step.
- Under torch.distributed each process takes its share of the step's rows; the KL sums and the
  gradients are added up over processes by the caller.
- ``held_out_kl``: the same forward without autograd on rows training never draws, to judge
  (and keep the best of) the values each stage produces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hydracc.analysis.calibration import Calibration
from hydracc.analysis.head import Compared, compare, draw
from hydracc.analysis.layerwise import Hook, NonFiniteError, Runner, forward_sweep, load_head, release, suffix_hidden
from hydracc.analysis.scores import calibration_batches, site_qkv
from hydracc.kernels.kinds import FULL, PARAM_NAMES, kind_by_name
from hydracc.kernels.naive import hybrid_attention_reference
from hydracc.planning.plan import Plan


def student_hook(plan: Plan, runner: Runner, params: dict[str, Tensor], param_name: Any) -> Hook:
    """The site hook that runs each converted layer's hybrid attention with ``params``."""
    sites = {s.layer: s for s in runner.captured.sites}

    def hook(layer: int, target: Any, args: tuple, kwargs: dict) -> Tensor:
        lp, site = plan.layer(layer), sites[layer]
        codes = [kind_by_name(h.kind).code for h in lp.heads]
        if all(c == FULL.code for c in codes):
            return target(*args, **kwargs)
        q, k, v = site_qkv(args, kwargs)
        layer_params = [params[param_name(site, n)] for n in PARAM_NAMES] if plan.layer_has_params(lp) else []
        out = hybrid_attention_reference(q, k, v, codes, site.scale, layer_params, head_windows=lp.head_windows())
        return out.to(q.dtype)

    return hook


STUDENT = "the converted model (with its current learned parameters)"
STUDENT_HINT = ("the learned parameters made the converted model's values non-finite: lower the learning rates "
                "(--lr, --e2e-lr) or train fewer steps (--steps, --e2e-steps)")


def check_logits(compared: Compared, what: str) -> None:
    """The teacher's logits (``compared.ce[0]``) and the KL must be finite; ``what`` names the rows."""
    if not bool(torch.isfinite(compared.ce[0]).all()):
        raise NonFiniteError(
            f"the original model's logits are not finite on {what} (after its last layer: final norm, LM head)",
            hint="check the final norm and LM head (lm_head, or the tied embeddings) weights in the checkpoint",
        )
    if not bool(torch.isfinite(compared.kl).all()):
        raise NonFiniteError(f"the KL of {STUDENT} is not finite on {what} (its logits overflow)", hint=STUDENT_HINT)


def _leaves(env: dict) -> dict:
    return {key: v.detach().requires_grad_() if isinstance(v, Tensor) and v.is_floating_point() else v for key, v in env.items()}


class Teacher:
    """The original model's final hidden states on this process's rows, ``[rows, T, H]`` on the CPU."""

    def __init__(self, runner: Runner, local: Calibration) -> None:
        batch = runner.captured.input_shape[0]
        batches = list(calibration_batches(local, batch))
        sweep = forward_sweep(runner, [ids for ids, _ in batches], None, keep=False)
        weights, _ = load_head(runner)
        with torch.no_grad():
            parts = [suffix_hidden(runner, weights, env)[:real].float().cpu() for env, (_, real) in zip(sweep.envs, batches)]
        self.hidden = torch.cat(parts)
        del weights, sweep
        release(runner.device)


def kl_step(runner: Runner, plan: Plan, params: dict[str, Tensor], param_name: Any, teacher: Teacher,
            local: Calibration, rows: list[int], tokens: int) -> float:
    """Add this process's share of the mean KL's gradient into ``params``' ``.grad``; return its KL sum.

    ``rows``: indices into ``local`` (this process's calibration rows) of the step; ``tokens``:
    the step's token count over every process (the mean's denominator).
    """
    g = runner.graph
    batch = runner.captured.input_shape[0]
    seq = local.seq_len
    chosen = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    ids_list, reals = [], []
    for part in chosen:
        padded = part + [part[0]] * (batch - len(part))
        ids_list.append(torch.from_numpy(local.tokens[padded]).long())
        reals.append(len(part))
    with torch.no_grad():
        sweep = forward_sweep(runner, ids_list, student_hook(plan, runner, {k: v.detach() for k, v in params.items()}, param_name),
                              model=STUDENT, hint=STUDENT_HINT)
    weights, head = load_head(runner)
    grads: list[dict[str, Tensor]] = []
    kl_sum = 0.0
    for bi, (part, real) in enumerate(zip(chosen, reals)):
        leaves = _leaves(sweep.boundaries[g.suffix.index][bi])
        keys = [k for k, v in leaves.items() if isinstance(v, Tensor) and v.requires_grad]
        with torch.enable_grad():
            h = suffix_hidden(runner, weights, leaves)[:real]
            flat = h.reshape(-1, h.shape[-1])
            with torch.no_grad():
                base = teacher.hidden[part].reshape(-1, h.shape[-1]).to(runner.device, flat.dtype)
                gen = torch.Generator(device=flat.device)
                cmp = compare(head, base, [flat.detach()], torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device))
                check_logits(cmp, "the training rows")
                kl_sum += float(cmp.kl.double().sum())
                grad = (draw(head, flat.detach(), 0, gen).expected - draw(head, base, 0, gen).expected) / tokens
            got = torch.autograd.grad(flat, [leaves[k] for k in keys], grad.to(flat.dtype), allow_unused=True)
        grads.append({k: gr for k, gr in zip(keys, got) if gr is not None})
        assert flat.shape[0] == real * seq
    del weights, head
    for seg in reversed(g.layers):
        weights = runner.load(seg)
        mine = {n: p for n, p in params.items() if n.startswith(f"{runner.captured.site(seg.layer).module}.hydra.")}
        for bi in range(len(chosen)):
            needed = [grads[bi].get(k) for k in seg.outputs]
            leaves = _leaves(sweep.boundaries[seg.index][bi])
            keys = [k for k, v in leaves.items() if isinstance(v, Tensor) and v.requires_grad]
            with torch.enable_grad():
                outs = runner.call(seg, weights, leaves, hook=student_hook(plan, runner, params, param_name))
                pairs = [(o, gr) for o, gr in zip(outs, needed) if gr is not None]
                names = list(mine)
                got = torch.autograd.grad([o for o, _ in pairs], [mine[n] for n in names] + [leaves[k] for k in keys],
                                          [gr for _, gr in pairs], allow_unused=True)
            for n, gr in zip(names, got[: len(names)]):
                if gr is not None:
                    mine[n].grad = gr if mine[n].grad is None else mine[n].grad + gr
            for k in seg.outputs:
                grads[bi].pop(k, None)
            for k, gr in zip(keys, got[len(names) :]):
                if gr is not None:
                    grads[bi][k] = grads[bi][k] + gr if k in grads[bi] else gr
        del weights
        release(runner.device)
    return kl_sum


def held_out_kl(runner: Runner, plan: Plan, params: dict[str, Tensor], param_name: Any, teacher: Teacher,
                local: Calibration, rows: list[int]) -> tuple[float, int]:
    """The KL(original || converted) summed over the positions of ``rows`` (indices into ``local``), and
    their count; forward only."""
    if not rows:
        return 0.0, 0
    batch = runner.captured.input_shape[0]
    fixed = {k: v.detach() for k, v in params.items()}
    parts = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    ids = [torch.from_numpy(local.tokens[part + [part[0]] * (batch - len(part))]).long() for part in parts]
    total, count = 0.0, 0
    with torch.no_grad():
        sweep = forward_sweep(runner, ids, student_hook(plan, runner, fixed, param_name), keep=False, model=STUDENT,
                              hint=STUDENT_HINT)
        weights, head = load_head(runner)
        for part, env in zip(parts, sweep.envs):
            h = suffix_hidden(runner, weights, env)[: len(part)]
            flat = h.reshape(-1, h.shape[-1])
            base = teacher.hidden[part].reshape(-1, h.shape[-1]).to(flat.device, flat.dtype)
            zeros = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
            cmp = compare(head, base, [flat], zeros)
            check_logits(cmp, "the held-out rows")
            total += float(cmp.kl.double().sum())
            count += flat.shape[0]
        del weights, head, sweep
    release(runner.device)
    return total, count
