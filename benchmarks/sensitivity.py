"""How the linear-cost sensitivity ranking agrees with the exact one, and what each costs.

    python benchmarks/sensitivity.py examples/tiny-llama
    python benchmarks/sensitivity.py examples/tiny-qwen --calib examples/tiny-qwen/calib.npy
    python benchmarks/sensitivity.py /tmp/q06 --calib-samples 4 --seq-len 128   # a random Qwen3-0.6B shape

For one checkpoint and calibration: the analysis with ``--sensitivity exact`` (every unit
re-measured), ``estimate`` (one backward sweep per loss) and ``auto`` (the default: estimates,
then the ``--exact-k`` units around the cut re-measured). Reports the rank correlation
(Spearman) of the estimated KL with the exact KL, of the first-order recall estimate with the
exact recall change, and whether the plan at ``--full-ratio`` keeps the same units full, with
each method's seconds. Prints markdown.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--calib", default=None, help="calibration data, as convert --calib takes it (default: built-in)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--full-ratio", type=float, default=0.25)
    ap.add_argument("--fisher-samples", type=int, default=2)
    args = ap.parse_args()

    import torch

    from hydracc.analysis.scores import analyze
    from hydracc.convert import calibration_for, inspect_checkpoint, make_plan
    from hydracc.pipeline.stages import budget_cut
    from hydracc.planning.budget import Budget

    insp = inspect_checkpoint(args.model, calibration=(args.calib_samples, args.seq_len), dtype=torch.float32)
    cal = calibration_for(insp, args.calib, samples=args.calib_samples, seq_len=args.seq_len)
    budget = Budget(full_ratio=args.full_ratio)
    cut = budget_cut(insp, budget)
    runs, seconds = {}, {}
    for method in ("exact", "estimate", "auto"):
        start = time.perf_counter()
        runs[method] = analyze(insp.captured, insp.read_weight, cal, method=method, cut=cut, fisher_samples=args.fisher_samples)
        seconds[method] = time.perf_counter() - start

    def units(result, field: str) -> np.ndarray:
        return np.array([x for ls in result.layers for x in getattr(ls, field)], dtype=float)

    def full_units(result) -> set:
        plan = make_plan(insp, budget=budget, strategy="heads", analysis=result)
        return {(lp.layer, h) for lp in plan.layers for h, hp in enumerate(lp.heads) if hp.kind == "full"}

    exact_kl, exact_recall = units(runs["exact"], "unit_sensitivity"), units(runs["exact"], "unit_recall")
    est_kl, est_recall = units(runs["estimate"], "unit_kl_estimate"), units(runs["estimate"], "unit_recall_estimate")
    truth = full_units(runs["exact"])

    def same(result) -> str:
        got = full_units(result)
        return "yes" if got == truth else f"{len(got & truth)} of {len(truth)} heads"

    print(f"# {args.model}: {len(exact_kl)} units, {args.calib_samples} x {args.seq_len} calibration tokens "
          f"({args.calib or 'built-in'}), "
          f"full ratio {args.full_ratio}, {args.fisher_samples} Fisher draws; torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print("| method | seconds | KL rank corr. with exact | recall rank corr. with exact | same full units as exact |")
    print("|---|---|---|---|---|")
    print(f"| exact | {seconds['exact']:.1f} | 1 | 1 | yes |")
    print(f"| estimate | {seconds['estimate']:.1f} | {spearman(est_kl, exact_kl):.3f} | "
          f"{spearman(est_recall, exact_recall):.3f} | {same(runs['estimate'])} |")
    auto_kl = units(runs["auto"], "unit_sensitivity")
    print(f"| auto | {seconds['auto']:.1f} | {spearman(auto_kl, exact_kl):.3f} | - | {same(runs['auto'])} |")


if __name__ == "__main__":
    main()
