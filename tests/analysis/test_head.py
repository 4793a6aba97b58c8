"""The LM head in vocabulary chunks against full logits: log-partition, draws, gradients, KL, cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hydracc.analysis.head as head_mod
from hydracc.analysis.head import Head, compare, draw, split_head
from hydracc.analysis.layerwise import split_by_layer
from hydracc.convert import inspect_checkpoint


def _head(vocab: int = 300, hidden: int = 16, bias: bool = True, seed: int = 0) -> tuple[Head, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, hidden, generator=g).to(torch.bfloat16)
    b = torch.randn(vocab, generator=g) if bias else None
    return Head(w, b, torch.float32), w, b


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(head_mod, "CHUNK_BYTES", 4 * 16 * 64)  # the smallest chunks (256 columns): 300 = 256 + a ragged 44


def test_draw_matches_full_logits() -> None:
    head, w, b = _head()
    h = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    assert [(v0, v1) for v0, v1, _ in head.chunks([h])] == [(0, 256), (256, 300)]
    z = F.linear(h, w.float(), b)
    d = draw(head, h, n_samples=3, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(d.lse, z.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.expected, z.softmax(-1) @ w.float(), rtol=1e-4, atol=1e-5)
    # the gradient of log p(y) at h is W[y] - E_p[W]
    y = d.samples[0]
    hh = h.clone().requires_grad_()
    F.log_softmax(F.linear(hh, w.float(), b), -1).gather(-1, y[:, None]).sum().backward()
    torch.testing.assert_close(head.rows(y) - d.expected, hh.grad, rtol=1e-4, atol=1e-5)


def test_draws_follow_the_distribution() -> None:
    """Gumbel-max over chunks draws from softmax(z): frequencies match over many positions."""
    head, w, b = _head(vocab=200, hidden=4, bias=False, seed=3)
    h = torch.randn(1, 4, generator=torch.Generator().manual_seed(4)).expand(4000, 4).contiguous()
    d = draw(head, h, n_samples=1, generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(d.samples[0], minlength=200).float() / 4000
    p = F.linear(h[:1], w.float()).softmax(-1)[0]
    assert (counts - p).abs().max() < 0.03
    assert len(set(d.samples[0].tolist())) > 10


def test_compare_matches_full_logits() -> None:
    head, w, b = _head()
    g = torch.Generator().manual_seed(6)
    base = torch.randn(16, 16, generator=g)
    variants = [base + 0.3 * torch.randn(16, 16, generator=g) for _ in range(3)]
    targets = torch.randint(0, 300, (16,), generator=g)
    got = compare(head, base, variants, targets)
    lp = F.log_softmax(F.linear(base, w.float(), b), -1)
    for i, v in enumerate(variants):
        lq = F.log_softmax(F.linear(v, w.float(), b), -1)
        torch.testing.assert_close(got.kl[i], (lp.exp() * (lp - lq)).sum(-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.ce[i + 1], -lq.gather(-1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.ce[0], -lp.gather(-1, targets[:, None])[:, 0], rtol=1e-5, atol=1e-5)


def test_without_a_weight_the_inputs_are_the_logits() -> None:
    head = Head(None, None, torch.float32, vocab=50)
    z = torch.randn(8, 50, generator=torch.Generator().manual_seed(7))
    d = draw(head, z, n_samples=1, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(d.expected, z.softmax(-1))
    got = compare(head, z, [z * 0.5], torch.zeros(8, dtype=torch.long))
    lp, lq = z.log_softmax(-1), (z * 0.5).log_softmax(-1)
    torch.testing.assert_close(got.kl[0], (lp.exp() * (lp - lq)).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2-mha"])
def test_the_suffix_splits_at_the_lm_head(tiny_checkpoint, name) -> None:
    insp = inspect_checkpoint(tiny_checkpoint(name), capture_shape=(2, 12))
    graph = split_by_layer(insp.captured, insp.captured.graph_module)
    assert graph.head is not None
    kind, weight = graph.suffix.args[graph.head.weight_arg]
    assert kind == "weight" and weight in ("lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight")
    assert split_head(graph.prefix.module) is None  # the prefix ends in no head
