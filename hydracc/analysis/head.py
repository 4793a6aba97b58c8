"""The LM head in vocabulary chunks: log-partition, sampling, loss gradients and KL without full logits.

Design decisions:
- The suffix of the captured graph is split at its last op when that op is ``aten.linear``
  with a weight (the LM head): the part before it (final norm) runs as a graph, the head runs
  here, ``CHUNK_BYTES`` of logits at a time, its weight kept in the checkpoint's dtype and cast
  one chunk at a time. What a full ``[positions, vocab]`` float32 logits tensor would cost
  (2.5 GB for 16 x 256 rows of a 151,936-token vocabulary) is never allocated.
- Everything is one pass over the chunks with a running maximum (online softmax): the
  log-partition, Gumbel-max draws from the model's own distribution, the expected weight row
  ``E_p[W]`` (the gradient of ``log p(y)`` at the hidden state is ``W[y] - E_p[W]``), and for
  exact re-measurements ``E_p[z]``, ``E_p[z']`` and the variants' own log-partitions (KL(p||q) =
  ``E_p[z] - lse - E_p[z'] + lse'``).
- A suffix that does not end in such a linear runs whole (a ``Head`` without a weight): its
  logits are the one chunk, and ``W`` is the identity.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx

CHUNK_BYTES = 32 * 2**20
"""Largest float32 logits (or weight) chunk held at once."""


@dataclass
class HeadSplit:
    """Where the LM head is in the suffix: the ``aten.linear`` feeding the logits output."""

    prehead: fx.GraphModule
    """The suffix without the head: same inputs, returns the head's input (the final hidden state)."""
    weight_arg: int
    """Position of the head weight among the suffix's inputs."""
    bias_arg: int | None


def split_head(module: fx.GraphModule) -> HeadSplit | None:
    """Split a suffix graph whose (first) output is ``aten.linear(x, W[, b])`` with W an input."""
    graph = module.graph
    out = next(n for n in graph.nodes if n.op == "output")
    produced = out.args[0]
    first = produced[0] if isinstance(produced, (tuple, list)) else produced
    if not (isinstance(first, fx.Node) and first.op == "call_function" and first.target == torch.ops.aten.linear.default):
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    weight = first.args[1]
    bias = first.args[2] if len(first.args) > 2 else None
    if weight not in placeholders or len(weight.users) != 1 or (bias is not None and bias not in placeholders):
        return None
    pre = copy.deepcopy(module)
    node_map = {a.name: a for a in pre.graph.nodes}
    linear = node_map[first.name]
    pre_out = next(n for n in pre.graph.nodes if n.op == "output")
    pre_out.args = (linear.args[0],)
    pre.graph.erase_node(linear)
    pre.graph.eliminate_dead_code()
    pre.recompile()
    return HeadSplit(pre, placeholders.index(weight), placeholders.index(bias) if bias is not None else None)


class Head:
    """Logits ``z = h W^T + b`` of hidden states ``h`` ``[N, H]``, chunk by chunk over the vocabulary."""

    def __init__(self, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype, vocab: int | None = None) -> None:
        self.weight = weight
        self.bias = bias
        self.dtype = dtype
        self.vocab = int(weight.shape[0]) if weight is not None else int(vocab or 0)

    def chunk_size(self, n: int, hidden: int) -> int:
        return int(max(256, min(self.vocab, CHUNK_BYTES // (4 * max(n, hidden, 1)))))

    def chunks(self, hs: Sequence[Tensor], span: tuple[int, int] | None = None) -> Iterator[tuple[int, int, list[Tensor]]]:
        """``(v0, v1, [z[:, v0:v1] for each h])``; without a weight, ``hs`` are the logits, yielded once.
        ``span``: just that one chunk."""
        if self.weight is None:
            yield 0, self.vocab, [h.to(self.dtype) for h in hs]
            return
        step = self.chunk_size(hs[0].shape[0], hs[0].shape[1])
        for v0 in [span[0]] if span is not None else range(0, self.vocab, step):
            v1 = span[1] if span is not None else min(v0 + step, self.vocab)
            w = self.weight[v0:v1].to(self.dtype)
            b = self.bias[v0:v1].to(self.dtype) if self.bias is not None else None
            yield v0, v1, [torch.nn.functional.linear(h.to(self.dtype), w, b) for h in hs]

    def rows(self, index: Tensor) -> Tensor:
        """``W[index]`` ``[N, H]`` in float32 (without a weight: one-hot rows of the logits)."""
        if self.weight is None:
            return torch.nn.functional.one_hot(index, self.vocab).float()
        return self.weight.index_select(0, index).float()

    def expect_rows(self, p: Tensor, v0: int, v1: int) -> Tensor:
        """``p @ W[v0:v1]`` for probabilities ``p`` ``[N, v1 - v0]`` (without a weight: ``p``)."""
        if self.weight is None:
            return p
        return p @ self.weight[v0:v1].to(self.dtype)


@dataclass
class Draws:
    lse: Tensor
    """``[N]`` log-partition."""
    expected: Tensor
    """``[N, H]`` ``E_p[W]`` (without a weight: ``p``)."""
    samples: list[Tensor]
    """Per draw, ``[N]`` token ids drawn from ``p``."""


def draw(head: Head, h: Tensor, n_samples: int, generator: torch.Generator) -> Draws:
    """One pass: log-partition, ``E_p[W]`` and ``n_samples`` Gumbel-max draws per position of ``h`` ``[N, H]``."""
    n = h.shape[0]
    m = torch.full((n,), float("-inf"), device=h.device)
    s = torch.zeros(n, device=h.device)
    acc: Tensor | None = None
    best = [torch.full((n,), float("-inf"), device=h.device) for _ in range(n_samples)]
    arg = [torch.zeros(n, dtype=torch.long, device=h.device) for _ in range(n_samples)]
    for v0, v1, (z,) in head.chunks([h]):
        z = z.float()
        m_new = torch.maximum(m, z.max(-1).values)
        scale = (m - m_new).exp()
        e = (z - m_new[:, None]).exp()
        s = s * scale + e.sum(-1)
        part = head.expect_rows(e.to(head.dtype), v0, v1).float()
        acc = part if acc is None else acc * scale[:, None] + part
        m = m_new
        for i in range(n_samples):
            u = torch.rand(z.shape, generator=generator, device=z.device).clamp_(1e-20, 1.0)
            value, index = (z - (-u.log()).log()).max(-1)
            better = value > best[i]
            best[i] = torch.where(better, value, best[i])
            arg[i] = torch.where(better, index + v0, arg[i])
    assert acc is not None
    return Draws(m + s.log(), acc / s[:, None], arg)


@dataclass
class Compared:
    kl: Tensor
    """``[variants, N]`` KL(p || q_variant) per position."""
    ce: Tensor
    """``[1 + variants, N]`` cross-entropy of ``targets`` (row 0: the base model)."""


def compare(head: Head, base: Tensor, variants: Sequence[Tensor], targets: Tensor) -> Compared:
    """One pass: KL from the base distribution to each variant's, and every model's cross-entropy of ``targets``.

    Per chunk the base logits are computed once and each variant's in turn, so the chunk is sized
    for one ``[N, chunk]`` tensor at a time whatever the number of variants."""
    hs = [base, *variants]
    n = base.shape[0]
    k = len(hs)
    m = torch.full((k, n), float("-inf"), device=base.device)
    s = torch.zeros(k, n, device=base.device)
    t = torch.zeros(k, n, device=base.device)  # sum over the vocabulary of exp(z_base - m_base) * z_j
    picked = torch.zeros(k, n, device=base.device)
    for v0, v1, (z_base,) in head.chunks([base]):
        z_base = z_base.float()
        m_base = torch.maximum(m[0], z_base.max(-1).values)
        base_scale = (m[0] - m_base).exp()
        weights = (z_base - m_base[:, None]).exp()  # the base distribution, up to its normalizer
        inside = (targets >= v0) & (targets < v1)
        local = (targets - v0).clamp(0, v1 - v0 - 1)[:, None]
        for j, h in enumerate(hs):
            z = z_base if j == 0 else next(head.chunks([h], (v0, v1)))[2][0].float()
            m_new = m_base if j == 0 else torch.maximum(m[j], z.max(-1).values)
            s[j] = s[j] * (m[j] - m_new).exp() + (z - m_new[:, None]).exp().sum(-1)
            m[j] = m_new
            t[j] = t[j] * base_scale + (weights * z).sum(-1)
            picked[j] = torch.where(inside, z.gather(-1, local)[:, 0], picked[j])
            del z
    lse = m + s.log()
    expect = t / s[0]  # E_p[z_j] under the base distribution
    kl = (expect[0] - lse[0])[None] - (expect[1:] - lse[1:])
    return Compared(kl, lse - picked)
