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


def _stable(report: dict) -> dict:
    """An analysis JSON without its timings (the only part that differs between equal runs)."""
    report.get("sensitivity", {}).pop("seconds", None)
    return report


def _peaky_checkpoint(tmp_path, heads: int, kv: int):
    model = build_tiny_model("llama", heads, kv, layers=2, hidden=32, seed=3)
    with torch.no_grad():  # sharper attention, so that making a head linear visibly changes the output
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_learned_kinds_report_a_linear_error(tmp_path) -> None:
    """hedgehog and gdn heads are scored at their starting values, but their per-head linear_error
    (measured in the same pass as those values' statistics) is elu's: never a vacuous zero."""
    src = _peaky_checkpoint(tmp_path, 4, 2)
    cal = default_calibration(vocab_size=64, samples=4, seq_len=20)
    insp = inspect_checkpoint(src, capture_shape=(4, 20))
    elu = analyze(insp.captured, insp.load_weights(), cal, sensitivity=False)
    for kind in ("hedgehog", "gdn"):
        learned = analyze(insp.captured, insp.load_weights(), cal, linear_kind=kind, sensitivity=False)
        assert learned.extra["scored_as"] == kind and learned.extra["fusion"] is True
        for a, b in zip(learned.layers, elu.layers):
            assert [h.linear_error for h in a.heads] == [h.linear_error for h in b.heads]
            assert all(h.linear_error > 0 for h in a.heads)


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
        runs.append(_stable(analyze(insp.captured, insp.load_weights(), cal).to_json()))
    assert runs[0] == runs[2]
    a, b = runs[0]["layers"], runs[1]["layers"]
    for la, lb in zip(a, b):
        np.testing.assert_allclose(la["unit_sensitivity"], lb["unit_sensitivity"], rtol=1e-4, atol=1e-8)
        for ha, hb in zip(la["heads"], lb["heads"]):
            np.testing.assert_allclose(list(ha.values()), list(hb.values()), rtol=1e-4, atol=1e-6)


def test_calibration_shape_and_length_mismatch(tmp_path) -> None:
    assert calibration_shape(20, 64) == (8, 64) and calibration_shape(3, 64) == (3, 64)
    assert calibration_shape(16, 256, vocab_size=151_936) == (1, 256)  # one row's logits are 155 MB already
    assert calibration_shape(16, 256, vocab_size=32_000) == (4, 256)
    src = _peaky_checkpoint(tmp_path, 4, 2)
    insp = inspect_checkpoint(src, capture_shape=(2, 16))
    with pytest.raises(ValueError, match="length"):
        analyze(insp.captured, insp.load_weights(), Calibration(np.zeros((2, 12), dtype=np.int64), "zeros"))


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2-mha"])
def test_lazy_reads_give_the_same_scores_as_weights_in_memory(tiny_checkpoint, name) -> None:
    """Reading each weight from the checkpoint when its layer runs changes nothing."""
    cal = default_calibration(vocab_size=64, samples=3, seq_len=16)
    insp = inspect_checkpoint(tiny_checkpoint(name), capture_shape=(3, 16))
    in_memory = _stable(analyze(insp.captured, insp.load_weights(), cal).to_json())
    lazy = _stable(analyze(insp.captured, insp.read_weight, cal).to_json())
    assert lazy == in_memory


def _deep_checkpoint(tmp_path):
    """4 layers x 4 heads (MHA): 16 units, more than the exact window."""
    model = build_tiny_model("llama", 4, 4, layers=4, hidden=32, seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    model.save_pretrained(tmp_path)
    return tmp_path


def _units(result, field: str) -> np.ndarray:
    return np.array([x for ls in result.layers for x in getattr(ls, field)], dtype=float)


def _rank_corr(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_estimates_rank_units_like_the_exact_measure(tmp_path) -> None:
    """One backward sweep per loss (Fisher draws for the KL) orders units as re-running every one does."""
    src = _deep_checkpoint(tmp_path)
    cal = default_calibration(vocab_size=64, samples=8, seq_len=32)
    insp = inspect_checkpoint(src, capture_shape=(4, 32))
    exact = analyze(insp.captured, insp.read_weight, cal, method="exact")
    est = analyze(insp.captured, insp.read_weight, cal, method="estimate", fisher_samples=8)
    assert est.extra["sensitivity"]["exact_units"] == 0 and exact.extra["sensitivity"]["exact_units"] == 16
    kl_est, kl_exact = _units(est, "unit_kl_estimate"), _units(exact, "unit_sensitivity")
    assert _rank_corr(kl_est, kl_exact) > 0.8, (kl_est, kl_exact)
    # the estimate is a second-order form: the right size, not a different quantity
    assert 0.3 < kl_est.sum() / kl_exact.sum() < 3.0
    assert _rank_corr(_units(est, "unit_recall_estimate"), _units(exact, "unit_recall")) > 0.3


def test_auto_re_measures_the_window_around_the_cut_jointly(tmp_path) -> None:
    """Outside the window the estimates rank; the window's slots are settled by backward elimination
    with the rest of the plan applied, each step re-measured exactly."""
    from hydracc.analysis.layerwise import Runner, forward_sweep, split_by_layer
    from hydracc.analysis.sensitivity import BatchInfo, measure, recall_positions
    from hydracc.kernels.naive import run_kind

    src = _deep_checkpoint(tmp_path)
    cal = default_calibration(vocab_size=64, samples=8, seq_len=32)
    insp = inspect_checkpoint(src, capture_shape=(4, 32))
    auto = analyze(insp.captured, insp.read_weight, cal, method="auto", objective="kl", cut=6, exact_k=4, fisher_samples=8)
    est = _units(auto, "unit_kl_estimate")
    ranked = [int(i) for i in np.argsort(-est, kind="stable")]
    priority = [p for ls in auto.layers for p in ls.unit_priority]
    order = sorted(range(16), key=lambda i: priority[i])
    assert order[:4] == ranked[:4] and order[8:] == ranked[8:]  # outside the window: the estimates' order
    assert sorted(order[4:8]) == sorted(ranked[4:8])
    joint = auto.extra["objective"]["joint"]
    assert joint["configurations"] == 4 + 3 and len(joint["kept"]) == 2 and len(joint["removed"]) == 2
    decided = [d for ls in auto.layers for d in ls.unit_decided_by]
    assert {decided[i] for i in ranked[4:8]} == {"joint"} and {decided[i] for i in ranked[:4]} == {"kl"}
    # the first removal is the window unit whose removal, with ranks 8.. linear, raises the KL least
    cap = insp.captured
    runner = Runner(split_by_layer(cap, cap.graph_on(torch.device("cpu"))), cap, insp.read_weight, torch.device("cpu"),
                    torch.float32)
    batches = [BatchInfo(ids, real, recall_positions(ids[:real])) for ids, real in
               __import__("hydracc.analysis.scores", fromlist=["x"]).calibration_batches(cal, 4)]
    sweep = forward_sweep(runner, [b.ids for b in batches])
    unit = [(ls.layer, u) for ls in auto.layers for u in range(4)]

    def run(layer, heads, q, k, v):
        return run_kind(1, q, k, v, cap.site(layer).scale)

    below = [unit[i] for i in ranked[8:]]
    trials = [[(layer, [u]) for layer, u in below + [unit[i]]] for i in ranked[4:8]]
    losses = [ex.kl for ex in measure(runner, sweep, batches, trials, run)]
    first = unit[ranked[4 + int(np.argmin(losses))]]
    assert joint["removed"][0] == f"{first[0]}.{first[1]}"


def test_recall_positions_mark_a_pair_seen_before() -> None:
    from hydracc.analysis.sensitivity import recall_positions

    tokens = torch.tensor([[5, 7, 9, 5, 7, 2, 5, 9]])
    pos = recall_positions(tokens)[0].tolist()
    # position 3 (5, next 7): the pair (5, 7) was at 0; position 6 (5, next 9) was never seen
    assert pos == [False, False, False, True, False, False, False, False]
