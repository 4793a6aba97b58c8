"""Head analysis: each score on constructed attention patterns, sensitivity against an oracle, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import build_tiny_model, load_original, use_oracle

from hydracc.analysis.calibration import Calibration, default_calibration
from hydracc.analysis.scores import _Accumulator, analyze, retrieval_targets, units_of
from hydracc.convert import calibration_shape, inspect_checkpoint

T = 24


def _tokens() -> torch.Tensor:
    """Two rows with repeats: a random prefix of 12 distinct tokens, then the same 12 again."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        first = torch.randperm(40, generator=g)[:12]
        rows.append(torch.cat([first, first]))
    return torch.stack(rows)


def _scores(probs_per_head: list[torch.Tensor], tokens: torch.Tensor):
    probs = torch.stack(probs_per_head, 1)  # [B, H, T, T]
    acc = _Accumulator(probs.shape[1])
    out = torch.randn(probs.shape[0], probs.shape[1], T, 4)
    acc.add(probs, retrieval_targets(tokens), out, out)
    return acc.scores()


def _uniform(b: int) -> torch.Tensor:
    m = torch.ones(T, T).tril()
    return (m / m.sum(-1, keepdim=True)).expand(b, T, T)


def _copy_head(tokens: torch.Tensor) -> torch.Tensor:
    """Attends to the position after the earlier occurrence of the current token (else to itself)."""
    b = tokens.shape[0]
    p = torch.zeros(b, T, T)
    targets = retrieval_targets(tokens)
    for i in range(b):
        for t in range(T):
            hits = targets[i, t].nonzero().flatten()
            p[i, t, hits[0] if len(hits) else t] = 1.0
    return p


def _previous_token(b: int) -> torch.Tensor:
    p = torch.zeros(b, T, T)
    p[:, 0, 0] = 1
    for t in range(1, T):
        p[:, t, t - 1] = 1
    return p


def _sink(b: int) -> torch.Tensor:
    p = torch.zeros(b, T, T)
    p[..., 0] = 1
    return p


def test_each_score_picks_out_its_constructed_head() -> None:
    tokens = _tokens()
    b = tokens.shape[0]
    copy, prev, sink, uniform = _scores([_copy_head(tokens), _previous_token(b), _sink(b), _uniform(b)], tokens)
    heads = [copy, prev, sink, uniform]
    assert max(heads, key=lambda s: s.retrieval) is copy and copy.retrieval > 0.9
    assert abs(uniform.retrieval) < 1e-6  # uniform attention gets no credit for copying
    assert min(heads, key=lambda s: s.distance) is prev and prev.distance == pytest.approx((T - 1) / T)
    assert max(heads, key=lambda s: s.sink) is sink and sink.sink == pytest.approx(1.0)
    assert uniform.entropy == pytest.approx(1.0, abs=1e-5) and prev.entropy == pytest.approx(0.0, abs=1e-5)
    assert uniform.distance == pytest.approx(np.mean([t / 2 for t in range(T)]), rel=1e-5)


def test_linear_error_is_zero_when_outputs_agree_and_grows_with_the_gap() -> None:
    acc = _Accumulator(2)
    tokens = _tokens()
    out = torch.randn(2, 2, T, 4)
    lin = out.clone()
    lin[:, 1] += 0.5 * out[:, 1]
    acc.add(torch.stack([_uniform(2)] * 2, 1), retrieval_targets(tokens), out, lin)
    same, off = acc.scores()
    assert same.linear_error == 0.0 and off.linear_error == pytest.approx(0.5, rel=1e-5)


def test_retrieval_targets_mark_the_token_after_an_earlier_occurrence() -> None:
    tokens = torch.tensor([[5, 7, 9, 5, 7]])
    t = retrieval_targets(tokens)[0]
    assert t[3].nonzero().flatten().tolist() == [1]  # token 5 at position 3: earlier 5 at 0, next is position 1
    assert t[4].nonzero().flatten().tolist() == [2]
    assert not t[:3].any()


def _peaky_checkpoint(tmp_path, heads: int, kv: int):
    model = build_tiny_model("llama", heads, kv, layers=2, hidden=32, seed=3)
    with torch.no_grad():  # sharper attention, so that making a head linear visibly changes the output
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("heads", "kv"), [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_sensitivity_matches_an_independent_oracle(tmp_path, heads: int, kv: int) -> None:
    src = _peaky_checkpoint(tmp_path, heads, kv)
    cal = default_calibration(vocab_size=64, samples=5, seq_len=20)  # 5 rows, batch 4: a padded last batch
    insp = inspect_checkpoint(src, capture_shape=(4, 20))
    result = analyze(insp.captured, insp.load_weights(), cal)
    ids = torch.from_numpy(cal.tokens)
    with torch.no_grad():
        base = load_original(src)(ids).logits.log_softmax(-1)
        for ls in result.layers:
            site = insp.captured.site(ls.layer)
            assert len(ls.unit_sensitivity) == len(units_of(site)) == kv
            for u, members in enumerate(units_of(site)):
                kinds = {layer: ["full"] * heads for layer in range(2)}
                kinds[ls.layer] = ["elu" if h in members else "full" for h in range(heads)]
                var = use_oracle(load_original(src), kinds)(ids).logits.log_softmax(-1)
                expected = (base.exp() * (base - var)).sum(-1).mean().item()
                assert ls.unit_sensitivity[u] == pytest.approx(expected, rel=1e-3, abs=1e-7)
                assert all(ls.heads[h].sensitivity == ls.unit_sensitivity[u] for h in members)
    assert max(max(ls.unit_sensitivity) for ls in result.layers) > 1e-4  # the check above was not vacuous


def test_analysis_is_deterministic_and_independent_of_batch_size(tmp_path) -> None:
    src = _peaky_checkpoint(tmp_path, 4, 2)
    cal = default_calibration(vocab_size=64, samples=4, seq_len=16)
    runs = []
    for batch in (4, 2, 4):
        insp = inspect_checkpoint(src, capture_shape=(batch, 16))
        runs.append(analyze(insp.captured, insp.load_weights(), cal).to_json())
    assert runs[0] == runs[2]
    a, b = runs[0]["layers"], runs[1]["layers"]
    for la, lb in zip(a, b):
        np.testing.assert_allclose(la["unit_sensitivity"], lb["unit_sensitivity"], rtol=1e-4, atol=1e-8)
        for ha, hb in zip(la["heads"], lb["heads"]):
            np.testing.assert_allclose(list(ha.values()), list(hb.values()), rtol=1e-4, atol=1e-6)


def test_calibration_shape_and_length_mismatch(tmp_path) -> None:
    assert calibration_shape(20, 64) == (8, 64) and calibration_shape(3, 64) == (3, 64)
    src = _peaky_checkpoint(tmp_path, 4, 2)
    insp = inspect_checkpoint(src, capture_shape=(2, 16))
    with pytest.raises(ValueError, match="length"):
        analyze(insp.captured, insp.load_weights(), Calibration(np.zeros((2, 12), dtype=np.int64), "zeros"))


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2-mha"])
def test_prefix_reuse_gives_the_same_sensitivities(tiny_checkpoint, name) -> None:
    cal = default_calibration(vocab_size=64, samples=3, seq_len=16)
    insp = inspect_checkpoint(tiny_checkpoint(name), capture_shape=(3, 16))
    weights = insp.load_weights()
    reused = analyze(insp.captured, weights, cal, reuse_prefix=True).to_json()
    rerun = analyze(insp.captured, weights, cal, reuse_prefix=False).to_json()
    assert reused == rerun
