"""Conversion quality: every planning strategy and objective against layer-wise, random and the best plan of all.

Usage: python benchmarks/quality.py [--model examples/tiny-llama] [--calib FILE] [--recall FILE.npz]
       [--tasks ppl,mqar,passkey] [--budgets 0.25,0.125] [--exhaustive] [--workdir DIR] [--json FILE]

For each KV budget (default 25% and 12.5% of the original cache; the unit is the KV group) it
converts the model through ``hydracc.convert.convert`` (the one conversion the CLI runs) with
  - ``heads, recall first``: the default plan (``--objective recall``),
  - ``heads, KL``: ``--objective kl`` (output KL over all positions),
  - ``heads, retrieval score``: ``--score retrieval`` (attention-pattern copy score),
  - ``layers``: whole layers kept full (the layer-wise hybrid baseline),
  - ``random``: three seeded random plans (the mean is reported, each seed in the JSON; with
    ``--exhaustive`` also the exact expectation, the mean over every plan),
plus all heads linear, then scores each with ``hydracc eval`` (``--tasks``; ``--recall`` adds the
model's own recall probes, which then are the "recall" column; otherwise it is built-in MQAR).
``--exhaustive`` also converts and scores every plan at each budget (all ways to keep that share
of the KV groups full) and reports where each strategy's plan ranks and its share of the best
recall. The MQAR columns split its cells into short (128-256 tokens) and long (``LONG`` and up,
where a streaming window cannot hold the pairs). ``--calib`` is passed to every planned conversion. Deterministic: the same inputs give
the same table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LONG = 512
"""MQAR at this length and beyond is the "long" column: 8x the default 64-token streaming window."""
COLUMNS = ("ppl", "recall", "mqar", "mqar_short", "mqar_long", "passkey")
PLANS = (("heads, recall first", dict(strategy="heads", objective="recall")),
         ("heads, KL", dict(strategy="heads", objective="kl")),
         ("heads, retrieval score", dict(strategy="heads", score="retrieval")),
         ("layers", dict(strategy="layers")))


def full_layout(plan) -> str:
    return " ".join("".join("F" if k == "full" else "." for k in lp.kinds[:: lp.num_heads // lp.num_kv_heads]) for lp in plan.layers)


def summary(scores: dict) -> dict:
    out = {"ppl": scores["ppl"]["ppl"]} if "ppl" in scores else {}
    if "recall" in scores:
        out["recall"] = scores["recall"]["accuracy"]
        out["recall_by_set"] = scores["recall"]["by_set"]
    elif "mqar" in scores:
        out["recall"] = scores["mqar"]["accuracy"]
    if "mqar" in scores:
        out["mqar"] = scores["mqar"]["accuracy"]
        grid = scores["mqar"]["grid"]
        for name, keep in (("mqar_short", lambda n: n <= 256), ("mqar_long", lambda n: n >= LONG)):
            cells = [acc for cell, acc in grid.items() if keep(int(cell.rsplit("len=", 1)[1]))]
            if cells:
                out[name] = round(sum(cells) / len(cells), 4)
    if "passkey" in scores:
        out["passkey"] = scores["passkey"]["accuracy"]
    return out


class Bench:
    def __init__(self, model: Path, work: Path, tasks: tuple[str, ...], calib: Path | None, recall: Path | None) -> None:
        self.model, self.work, self.calib, self.recall = model, work, calib, recall
        self.tasks = tasks + (("recall",) if recall is not None else ())

    def score(self, path: Path) -> dict:
        from hydracc.evaluation.evaluate import evaluate

        return summary(evaluate(path, self.tasks, recall=self.recall).scores)

    def convert(self, name: str, **options) -> tuple[dict, object]:
        from hydracc.convert import convert

        out = self.work / name
        extra = {"calib": self.calib} if self.calib is not None and options.get("strategy", "heads") == "heads" else {}
        start = time.time()
        result = convert(self.model, out, force=True, **extra, **options)
        seconds = time.time() - start
        row = {"layout": full_layout(result.plan), "convert_seconds": round(seconds, 1), **self.score(out)}
        budget = result.plan.budget
        for key in ("objective", "objective_fell_back_to_kl", "full_decided_by", "stability"):
            if key in budget:
                row[key] = budget[key]
        return row, result

    def every_plan(self, kv: float) -> list[dict]:
        """Convert and score every plan keeping ``kv`` of the KV groups full (through ``--plan-file``)."""
        from hydracc.convert import convert, inspect_checkpoint, make_plan
        from hydracc.planning.budget import Budget

        insp = inspect_checkpoint(self.model)
        units = [(s.layer, g, s.num_heads // s.num_kv_heads) for s in insp.captured.sites for g in range(s.num_kv_heads)]
        insp.checkpoint.close()
        rows: list[dict] = []
        for combo in itertools.combinations(units, round(kv * len(units))):
            keep = [f"{layer}.{g * size}" for layer, g, size in combo]
            insp = inspect_checkpoint(self.model)
            try:
                plan = make_plan(insp, budget=Budget(kv_budget=kv), strategy="even", keep_full=keep)
            finally:
                insp.checkpoint.close()
            out = self.work / ("every-" + "_".join(keep))
            plan_file = out.with_name(out.name + ".plan.json")
            plan_file.write_text(plan.dumps())
            convert(self.model, out, plan_file=plan_file, force=True)
            rows.append({"layout": full_layout(plan), **self.score(out)})
            print(json.dumps(rows[-1]), file=sys.stderr)
        return rows


def times(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "tiny-llama")
    ap.add_argument("--calib", type=Path, default=None, help="calibration data for the planned conversions (--calib)")
    ap.add_argument("--recall", type=Path, default=None, help="the model's own recall probes (hydracc eval --recall)")
    ap.add_argument("--tasks", default="ppl,mqar,passkey", help="hydracc eval tasks, comma-separated")
    ap.add_argument("--budgets", default="0.25,0.125", help="KV budgets, comma-separated")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    ap.add_argument("--exhaustive", action="store_true", help="also score every plan at each budget (the ceiling)")
    args = ap.parse_args(argv)

    import transformers

    torch.set_num_threads(2)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="hydracc-quality-")
    work = args.workdir or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.model, work, tuple(t for t in args.tasks.split(",") if t), args.calib, args.recall)
    budgets = [float(b) for b in args.budgets.split(",")]
    start = time.time()
    rows: list[dict] = [{"plan": "original (all full)", "kv": 1.0, "layout": "", **bench.score(args.model)}]
    original = rows[0]
    every: dict[str, list[dict]] = {}
    for kv in budgets:
        for label, options in PLANS:
            row, _ = bench.convert(f"{label.replace(' ', '').replace(',', '-')}-{kv}", kv_budget=kv, **options)
            rows.append({"plan": label, "kv": kv, **row})
            print(json.dumps(rows[-1]), file=sys.stderr)
        seeds = []
        for seed in (0, 1, 2):
            row, _ = bench.convert(f"random-{seed}-{kv}", kv_budget=kv, strategy="random", seed=seed)
            seeds.append({"seed": seed, **row})
        keys = [k for k in COLUMNS if k in seeds[0]]
        mean = {k: round(sum(s[k] for s in seeds) / len(seeds), 4) for k in keys}
        rows.append({"plan": "random (mean of 3 seeds)", "kv": kv, "layout": " / ".join(s["layout"] for s in seeds),
                     **mean, "seeds": seeds})
        print(json.dumps(rows[-1]), file=sys.stderr)
        if args.exhaustive:
            every[str(kv)] = bench.every_plan(kv)
            plans = every[str(kv)]
            best = max(plans, key=lambda r: (r["recall"], -r.get("ppl", 0.0)))
            rows.append({"plan": f"best of all {len(plans)} plans (by recall)", "kv": kv, **best})
            # a random plan is uniform over these: its expected scores are their means (the 3 seeds estimate it)
            keys = [k for k in COLUMNS if k in plans[0]]
            rows.append({"plan": f"random, expected (mean of all {len(plans)} plans)", "kv": kv, "layout": "",
                         **{k: round(sum(r[k] for r in plans) / len(plans), 4) for k in keys}})
    row, _ = bench.convert("all-linear", kv_budget=0.0, strategy="even")
    rows.append({"plan": "all linear (elu)", "kv": 0.0, **row})

    print(f"model: {args.model.name}; calib: {args.calib or 'built-in'}; recall column: "
          f"{args.recall.name if args.recall else 'built-in MQAR'}; machine: {platform.machine()}, "
          f"{torch.get_num_threads()} threads; python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {time.time() - start:.0f} s in all")
    print()
    cols = [k for k in COLUMNS if k in original and not (k == "mqar" and args.recall is None)]
    print("| plan | KV cache kept | full KV groups (layer by layer) | decided by | stability | " + " | ".join(cols)
          + " | recall vs original |")
    print("|---|---|---|---|---|" + "---|" * len(cols) + "---|")
    for r in rows:
        rel = r["recall"] / original["recall"] if original.get("recall") else float("nan")
        decided = "; ".join(f"{k}: {', '.join(v)}" for k, v in (r.get("full_decided_by") or {}).items())
        if r.get("objective_fell_back_to_kl"):
            decided = "fell back to KL"
        sure = f"{r['stability']['agree']:.0%}" if r.get("stability") else ""
        cells = " | ".join(f"{r[k]:.3f}" if k == "ppl" else f"{r[k]:.1%}" for k in cols)
        print(f"| {r['plan']} | {r['kv']:.1%} | {r['layout']} | {decided} | {sure} | {cells} | {rel:.0%} |")
    for kv, plans in every.items():
        ranked = sorted(plans, key=lambda r: (-r["recall"], r.get("ppl", 0.0)))
        best = ranked[0]["recall"]
        print()
        print(f"At {float(kv):.1%}: {len(plans)} plans; best recall {best:.1%} ({ranked[0]['layout']})")
        for r in rows:
            if str(r["kv"]) == kv and r["plan"] in dict(PLANS):
                rank = next((i for i, e in enumerate(ranked, start=1) if e["layout"] == r["layout"]), None)
                share = r["recall"] / best if best else float("nan")
                print(f"- {r['plan']}: rank {rank} of {len(ranked)} by recall, {share:.0%} of the best")
        at = [r for r in rows if str(r["kv"]) == kv]
        layers = next(r["recall"] for r in at if r["plan"] == "layers")
        expected = next(r["recall"] for r in at if r["plan"].startswith("random, expected"))
        sampled = next(r["recall"] for r in at if r["plan"] == "random (mean of 3 seeds)")
        default = next(r["recall"] for r in at if r["plan"] == PLANS[0][0])
        print(f"- {PLANS[0][0]} against the better of layers and random: {times(default, max(layers, expected))} "
              f"(random expected {expected:.1%}); {times(default, max(layers, sampled))} with the 3 seeds' mean")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "every_plan": every}, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
