"""Conversion quality on the shipped example model: scored plans against layer-wise and random ones.

Usage: python benchmarks/quality.py [--model examples/tiny-llama] [--workdir DIR] [--json FILE] [--exhaustive]

For each KV budget (25% and 12.5% of the original cache; the unit is the KV group), converts
the model with
  - ``heads``: the scored plan (units ranked by output KL when made linear),
  - ``heads-retrieval``: the scored plan ranked by the retrieval (copy) score instead,
  - ``layers``: whole layers kept full (the layer-wise hybrid baseline),
  - ``random``: three seeded random plans (the mean is reported, and each seed in the JSON),
plus all heads linear (budget 0), then runs ``hydracc eval``'s default suite on each and on the
original. No distillation (that comes with the linear-kinds issue). Prints a Markdown table.
``--exhaustive`` also converts and scores every plan at 25% (all ways to keep a quarter of the
KV groups full; 28 for the example model) and prints where each strategy's plan ranks.
Everything is deterministic: the same model gives the same table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def convert_with(model: Path, out: Path, analysis, strategy: str, kv_budget: float, score: str = "sensitivity", seed: int = 0):
    from hydracc.convert import inspect_checkpoint, make_plan
    from hydracc.planning.budget import Budget

    insp = inspect_checkpoint(model)
    try:
        plan = make_plan(insp, budget=Budget(kv_budget=kv_budget), strategy=strategy, analysis=analysis, score=score, seed=seed)
    finally:
        insp.checkpoint.close()
    convert_by_plan(model, out, plan)
    return plan


def convert_by_plan(model: Path, out: Path, plan) -> None:
    """Convert ``model`` into ``out`` by ``plan`` (through ``hydracc.convert.convert``, like the CLI's --plan-file)."""
    from hydracc.convert import convert

    plan_file = out.with_name(out.name + ".plan.json")
    plan_file.write_text(plan.dumps())
    convert(model, out, plan_file=plan_file, force=True)


def exhaustive(model: Path, work: Path, kv_budget: float) -> list[dict]:
    """Convert and score every plan keeping ``kv_budget`` of the KV groups full."""
    import itertools

    from hydracc.convert import inspect_checkpoint, make_plan
    from hydracc.evaluation.evaluate import evaluate
    from hydracc.planning.budget import Budget

    insp = inspect_checkpoint(model)
    units = [(s.layer, g, s.num_heads // s.num_kv_heads) for s in insp.captured.sites for g in range(s.num_kv_heads)]
    insp.checkpoint.close()
    out: list[dict] = []
    for combo in itertools.combinations(units, round(kv_budget * len(units))):
        keep = [f"{layer}.{g * size}" for layer, g, size in combo]
        insp = inspect_checkpoint(model)
        try:
            plan = make_plan(insp, budget=Budget(kv_budget=kv_budget), strategy="even", keep_full=keep)
        finally:
            insp.checkpoint.close()
        path = work / ("every-" + "_".join(keep))
        convert_by_plan(model, path, plan)
        out.append({"layout": full_layout(plan), **summary(evaluate(path).scores)})
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def summary(scores: dict) -> dict:
    return {
        "ppl": scores["ppl"]["ppl"],
        "mqar": scores["mqar"]["accuracy"],
        "mqar_first": scores["mqar"]["first_query_accuracy"],
        "passkey": scores["passkey"]["accuracy"],
    }


def full_layout(plan) -> str:
    return " ".join("".join("F" if k == "full" else "." for k in lp.kinds[:: lp.num_heads // lp.num_kv_heads]) for lp in plan.layers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "tiny-llama")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    ap.add_argument("--exhaustive", action="store_true", help="also score every plan at 25%% (the ceiling)")
    args = ap.parse_args(argv)

    import transformers

    from hydracc.convert import analyze_heads, calibration_for, calibration_shape, inspect_checkpoint
    from hydracc.evaluation.evaluate import evaluate

    torch.set_num_threads(2)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="hydracc-quality-")
    work = args.workdir or Path(tmp.name)
    start = time.time()
    insp = inspect_checkpoint(args.model, capture_shape=calibration_shape())
    analysis = analyze_heads(insp, calibration_for(insp))
    insp.checkpoint.close()
    print(f"analysis done in {time.time() - start:.0f} s", file=sys.stderr)

    rows: list[dict] = []
    original = summary(evaluate(args.model).scores)
    rows.append({"plan": "original (all full)", "kv": 1.0, "layout": "FF FF FF FF", **original})
    for kv in (0.25, 0.125):
        for label, strategy, score in (("heads (by KL)", "heads", "sensitivity"), ("heads (by retrieval)", "heads", "retrieval"),
                                       ("layers", "layers", "sensitivity")):
            out = work / f"{strategy}-{score}-{kv}"
            plan = convert_with(args.model, out, analysis, strategy, kv, score)
            rows.append({"plan": label, "kv": kv, "layout": full_layout(plan), **summary(evaluate(out).scores)})
            print(json.dumps(rows[-1]), file=sys.stderr)
        seeds = []
        for seed in (0, 1, 2):
            out = work / f"random-{seed}-{kv}"
            plan = convert_with(args.model, out, analysis, "random", kv, seed=seed)
            seeds.append({"seed": seed, "layout": full_layout(plan), **summary(evaluate(out).scores)})
        mean = {k: round(sum(s[k] for s in seeds) / len(seeds), 4) for k in ("ppl", "mqar", "mqar_first", "passkey")}
        rows.append({"plan": "random (mean of 3 seeds)", "kv": kv, "layout": " / ".join(s["layout"] for s in seeds), **mean, "seeds": seeds})
        print(json.dumps(rows[-1]), file=sys.stderr)
    out = work / "all-linear"
    plan = convert_with(args.model, out, analysis, "even", 0.0)
    rows.append({"plan": "all linear (elu)", "kv": 0.0, "layout": full_layout(plan), **summary(evaluate(out).scores)})

    print(f"model: {args.model.name}; machine: {platform.machine()}, {torch.get_num_threads()} threads; "
          f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{time.time() - start:.0f} s in all")
    print()
    print("| plan | KV cache kept | full KV groups (layer by layer) | ppl | MQAR | MQAR first query | passkey | MQAR vs original | passkey vs original |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rel_m = r["mqar"] / original["mqar"] if original["mqar"] else float("nan")
        rel_p = r["passkey"] / original["passkey"] if original["passkey"] else float("nan")
        print(f"| {r['plan']} | {r['kv']:.1%} | {r['layout']} | {r['ppl']:.3f} | {r['mqar']:.1%} | {r['mqar_first']:.1%} | "
              f"{r['passkey']:.1%} | {rel_m:.0%} | {rel_p:.0%} |")
    every: list[dict] = []
    if args.exhaustive:
        every = exhaustive(args.model, work, 0.25)
        ranked = sorted(every, key=lambda r: (-r["mqar"], r["ppl"]))
        print()
        print(f"Every plan at 25% ({len(every)} plans), best five by MQAR then perplexity:")
        print()
        print("| rank | full KV groups | ppl | MQAR | passkey |")
        print("|---|---|---|---|---|")
        for i, r in enumerate(ranked[:5], start=1):
            print(f"| {i} | {r['layout']} | {r['ppl']:.3f} | {r['mqar']:.1%} | {r['passkey']:.1%} |")
        print()
        for r in rows:
            if r["kv"] == 0.25 and r["plan"] != "random (mean of 3 seeds)":
                rank = next((i for i, e in enumerate(ranked, start=1) if e["layout"] == r["layout"]), None)
                print(f"- {r['plan']}: rank {rank} of {len(ranked)} by MQAR")
        best_ppl = min(every, key=lambda r: r["ppl"])
        print(f"- lowest perplexity of all: {best_ppl['layout']} ({best_ppl['ppl']:.3f}); "
              f"passkey above 0 in {sum(1 for r in every if r['passkey'] > 0)} of {len(every)} plans")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "every_plan_at_25": every, "analysis": analysis.to_json()}, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
