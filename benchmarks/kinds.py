"""Head kinds on the example model: which linear kind recovers the most, with and without distillation.

Usage: python benchmarks/kinds.py [--model examples/tiny-llama] [--kv 0.25] [--steps 300] [--e2e-steps 100]
                                  [--samples 64] [--json FILE]

One plan (the scored 25%-KV plan, units ranked by output KL when made elu-linear) is kept for
every row; only what the converted heads become changes:
  - ``elu`` plain (no parameters), ``elu`` + fusion (fusion scales at their measured init);
  - ``hedgehog`` and ``gdn`` at their measured initial values (no training);
  - each of elu+fusion, hedgehog and gdn after ``--distill`` (stage 1: ``--steps`` per layer of
    attention transfer; stage 2: ``--e2e-steps`` of end-to-end KL);
  - ``streaming`` (sink 4 + window 64, no training).
Each converted model runs ``hydracc eval``'s default suite (held-out perplexity, MQAR, passkey);
recall is reported at short lengths (up to 256 tokens) and long ones (``LONG`` and up, where a
streaming window cannot hold what is asked).
The state column is the fixed per-sequence memory of the converted heads (linear states,
streaming windows) at the model's fp32 weights; the KV cache kept is the same for every row.
Deterministic: the same model and options give the same table. Prints a Markdown table.
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
LONG = 512
"""Lengths from here on are "long": 8x the default 64-token streaming window."""


def convert_kind(model: Path, out: Path, base_plan, kind: str, fusion: bool, settings, samples: int) -> dict:
    """Convert ``model`` by ``base_plan`` with its converted heads made ``kind``; return timings and losses."""
    from hydracc.convert import convert
    from hydracc.planning.plan import STREAMING_DEFAULTS

    doc = base_plan.to_json()
    doc["fusion"] = fusion
    for layer in doc["layers"]:
        for head in layer["heads"]:
            if head["kind"] != "full":
                head["kind"] = kind
                head["params"] = dict(STREAMING_DEFAULTS) if kind == "streaming" else {}
    plan_file = out.with_name(out.name + ".plan.json")
    plan_file.write_text(json.dumps(doc))
    start = time.time()
    result = convert(model, out, plan_file=plan_file, force=True, distill_settings=settings, distill_samples=samples)
    cost, learned = result.cost, result.learned
    return {"seconds": round(time.time() - start, 1), "state_bytes": cost.linear_state_bytes,
            "kv_ratio": round(cost.ratio, 4), "losses": learned.losses if learned is not None else {}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "tiny-llama")
    ap.add_argument("--kv", type=float, default=0.25, help="KV budget of the shared plan")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--e2e-steps", type=int, default=100)
    ap.add_argument("--samples", type=int, default=64, help="calibration rows to distill on")
    ap.add_argument("--kinds", default="elu,hedgehog,gdn,streaming")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import transformers

    from hydracc.convert import analyze_heads, calibration_for, calibration_shape, inspect_checkpoint, make_plan
    from hydracc.distill.train import DistillSettings
    from hydracc.evaluation.evaluate import evaluate
    from hydracc.planning.budget import Budget

    torch.set_num_threads(2)
    kinds = args.kinds.split(",")
    tmp = tempfile.TemporaryDirectory(prefix="hydracc-kinds-")
    work = Path(tmp.name)
    start = time.time()
    insp = inspect_checkpoint(args.model, capture_shape=calibration_shape())
    try:
        plan = make_plan(insp, budget=Budget(kv_budget=args.kv), strategy="heads", analysis=analyze_heads(insp, calibration_for(insp)))
    finally:
        insp.checkpoint.close()
    settings = DistillSettings(steps=args.steps, e2e_steps=args.e2e_steps)

    def split(cells: dict[str, float]) -> tuple[float, float]:  # mean over lengths <= 256, and over >= LONG
        short = [v for c, v in cells.items() if int(c.rsplit("len=", 1)[1]) <= 256]
        long = [v for c, v in cells.items() if int(c.rsplit("len=", 1)[1]) >= LONG]
        return round(sum(short) / max(1, len(short)), 4), round(sum(long) / max(1, len(long)), 4)

    def summary(path: Path) -> dict:
        s = evaluate(path).scores
        mqar_short, mqar_long = split(s["mqar"]["grid"])
        passkey_short, passkey_long = split(s["passkey"]["by_length"])
        return {"ppl": s["ppl"]["ppl"], "mqar": s["mqar"]["accuracy"], "mqar_first": s["mqar"]["first_query_accuracy"],
                "mqar_short": mqar_short, "mqar_long": mqar_long, "passkey": s["passkey"]["accuracy"],
                "passkey_short": passkey_short, "passkey_long": passkey_long}

    rows = [{"kind": "original (all full)", "distill": "-", "state_bytes": 0, "kv_ratio": 1.0, **summary(args.model)}]
    variants = []
    for kind in kinds:
        if kind == "elu":
            variants += [("elu", False, None), ("elu", True, None), ("elu", True, settings)]
        elif kind == "streaming":
            variants += [("streaming", False, None)]
        else:
            variants += [(kind, True, None), (kind, True, settings)]
    for kind, fusion, s in variants:
        label = kind + (" + fusion" if fusion and kind == "elu" else "")
        out = work / f"{kind}-{int(fusion)}-{'d' if s else 'i'}"
        info = convert_kind(args.model, out, plan, kind, fusion, s, args.samples)
        rows.append({"kind": label, "distill": f"{args.steps}+{args.e2e_steps} steps" if s else "no", **info, **summary(out)})
        print(json.dumps(rows[-1]), file=sys.stderr)

    layout = " ".join("".join("F" if k == "full" else "." for k in lp.kinds[:: lp.num_heads // lp.num_kv_heads]) for lp in plan.layers)
    print(f"model: {args.model.name}; plan: scored, {args.kv:.1%} of the KV cache, full KV groups {layout}; distill samples "
          f"{args.samples}; machine: {platform.machine()}, {torch.get_num_threads()} threads; python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}; {time.time() - start:.0f} s in all")
    print()
    print(f"| converted heads | distillation | state per sequence | ppl | MQAR <= 256 | MQAR >= {LONG} | passkey <= 256 | "
          f"passkey >= {LONG} | convert + distill time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        state = f"{r['state_bytes'] / 1024:.0f} KiB" if r["state_bytes"] else "-"
        secs = f"{r['seconds']:.0f} s" if "seconds" in r else "-"
        print(f"| {r['kind']} | {r['distill']} | {state} | {r['ppl']:.3f} | {r['mqar_short']:.1%} | {r['mqar_long']:.1%} | "
              f"{r['passkey_short']:.1%} | {r['passkey_long']:.1%} | {secs} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "plan": plan.to_json()}, indent=1) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
