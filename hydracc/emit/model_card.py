"""Emit stage, card part: the converted folder's ``README.md`` in the Hugging Face model-card format.

Decisions:
- Everything comes from the converted ``config.json`` (its ``hydra`` section: layers as the graph
  computes them, the plan with its budget and scores, distillation, provenance) plus the cache
  figures, so the card says what the checkpoint is, not what was asked for.
- YAML front matter: ``base_model`` (``--base-model``, else the input card's), ``license`` (the
  input card's), ``library_name: transformers``, ``tags``; written by hand in a fixed order, so
  the same conversion gives the same bytes (no timestamps).
- The input card is kept below ours, under "Original model card", with its front matter dropped
  (its fields that matter are carried up); nothing of it is lost.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hydracc.kernels.kinds import kind_by_name

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """An existing card's front matter (``{}`` if none or unreadable) and its body."""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    import yaml  # a transformers dependency; safe_load builds plain data only

    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        meta = None
    return (meta if isinstance(meta, dict) else {}), text[m.end():]


def _yaml_scalar(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def build_model_card(
    config: dict[str, Any],
    *,
    kv_bytes_per_token_before: int,
    kv_bytes_per_token_after: int,
    state_bytes_per_sequence: int,
    input_card: str | None = None,
    base_model: str | None = None,
    verify: dict[str, Any] | None = None,
) -> str:
    """The ``README.md`` text for a converted checkpoint whose config is ``config``."""
    hydra = config["hydra"]
    layers = hydra["layers"]
    plan = hydra.get("plan") or {}
    budget = plan.get("budget") or {}
    meta, body = split_card(input_card) if input_card else ({}, "")
    base = base_model or meta.get("base_model")
    kinds = sorted({k for entry in layers for k in entry["kinds"]}, key=lambda k: kind_by_name(k).code)
    tags = ["hydracc", "hybrid-attention"] + [f"{k}-attention" for k in kinds if k != "full"]

    front = ["---"]
    if base:
        bases = base if isinstance(base, list) else [base]
        front += ["base_model:"] + [f"- {_yaml_scalar(b)}" for b in bases]
    if meta.get("license") is not None:
        front.append(f"license: {_yaml_scalar(meta['license'])}")
    front += ["library_name: transformers", "tags:"] + [f"- {_yaml_scalar(t)}" for t in tags] + ["---", ""]

    model_type = config.get("model_type", "?")
    full = sum(k == "full" for entry in layers for k in entry["kinds"])
    heads = sum(len(entry["kinds"]) for entry in layers)
    ratio = kv_bytes_per_token_after / kv_bytes_per_token_before if kv_bytes_per_token_before else 1.0
    out = [
        f"# {model_type} with hybrid attention (hydracc)",
        "",
        f"A {model_type} checkpoint{f' converted from `{base}`' if base else ''} by hydracc "
        f"{hydra.get('provenance', {}).get('hydracc_version', '?')}: {full} of {heads} attention heads keep full softmax "
        "attention, the others run as fixed-state heads side by side with them in the same layers.",
        "",
        "## Plan",
        "",
        "| layer | module | heads (saved order) | full | converted | KV heads cached |",
        "|---|---|---|---|---|---|",
    ]
    for entry in layers:
        group = entry["num_heads"] // entry["num_kv_heads"]
        cached = sum(any(kind_by_name(k).keeps_kv for k in entry["kinds"][g * group:(g + 1) * group]) for g in range(entry["num_kv_heads"]))
        n_full = sum(k == "full" for k in entry["kinds"])
        out.append(f"| {entry['layer']} | `{entry['module']}` | {' '.join(entry['kinds'])} | {n_full} | "
                   f"{len(entry['kinds']) - n_full} | {cached}/{entry['num_kv_heads']} |")
    out += [
        "",
        f"KV cache per token: {_bytes(kv_bytes_per_token_before)} before, {_bytes(kv_bytes_per_token_after)} after "
        f"({ratio:.1%}); converted heads add a fixed {_bytes(state_bytes_per_sequence)} per sequence "
        "(linear states, streaming windows).",
        "",
        "## Head kinds",
        "",
    ]
    out += [f"- `{k}`: {kind_by_name(k).description}" for k in kinds]
    out += ["", "## How the plan was chosen", ""]
    if budget:
        how = budget.get("strategy", "?") + (f" by `{budget['score']}`" if "score" in budget else "")
        asked = (f"full ratio {budget['full_ratio']}" if budget.get("full_ratio") is not None
                 else f"KV budget {budget.get('kv_budget')}")
        out.append(f"Strategy {how}, {asked}: {budget.get('full_units', '?')} of {budget.get('total_units', '?')} "
                   f"{'KV group' if plan.get('unit') == 'kv_group' else 'head'}s kept full.")
        if budget.get("objective"):
            out.append(f"Objective `{budget['objective']}`" + (" (recall first, then output KL)" if budget["objective"] == "recall" else "")
                       + ("; the model failed its recall probes, so output KL decided" if budget.get("objective_fell_back_to_kl") else "")
                       + ".")
        decided = budget.get("full_decided_by") or {}
        if decided:
            units_are = " (each KV group named by its first query head, layer.head)." if plan.get("unit") == "kv_group" else "."
            out.append("Full units decided by: "
                       + "; ".join(f"`{how}` ({', '.join(map(str, units))})" for how, units in sorted(decided.items())) + units_are)
        score = budget.get("score")
        full = [(lp["layer"], h, head.get("scores", {})) for lp in plan.get("layers", [])
                for h, head in enumerate(lp.get("heads", [])) if head.get("kind") == "full"]
        columns = [c for c in dict.fromkeys(("recall", score)) if c and any(c in scores for _, _, scores in full)]
        kept = [(layer, h, [scores.get(c) for c in columns]) for layer, h, scores in full] if columns else []
        if kept and any(v is not None for _, _, vals in kept for v in vals):
            out += ["", "| layer.head (original order) | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            out += [f"| {layer}.{h} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals) + " |" for layer, h, vals in kept]
    else:
        out.append("Converted by a plan file given by hand.")
    distill = hydra.get("distill") or {}
    out += ["", "## Added parameters", ""]
    if distill.get("settings"):
        settings = ", ".join(f"{k} {v}" for k, v in sorted(distill["settings"].items()))
        out.append(f"Distilled ({settings}).")
        for key, (first, last) in sorted(distill.get("losses", {}).items()):
            out.append(f"- {key}: loss {first:.4f} -> {last:.4f}")
    elif any(entry.get("params") for entry in layers):
        out.append("Measured initial values (fusion scales, feature maps, gates); not distilled.")
    else:
        out.append("None: the converted heads have no learned parameters.")
    if verify:
        out += ["", *verification_section(verify)]
    out += [
        "",
        "## How to load",
        "",
        "```python",
        "import hydracc  # registers the hybrid attention with transformers",
        "from transformers import AutoModelForCausalLM",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")  # no trust_remote_code',
        "```",
        "",
        "It needs hydracc installed beside transformers (no remote code); `generate` uses hydracc's hybrid cache "
        "(keys and values only for the full heads' KV groups).",
        "",
        "## Provenance",
        "",
    ]
    prov = hydra.get("provenance", {})
    out.append(f"hydracc {prov.get('hydracc_version', '?')}, torch {prov.get('torch', '?')}, "
               f"transformers {prov.get('transformers', '?')}; passes: {', '.join(hydra.get('passes', []))}.")
    out += ["", "| input file | sha256 |", "|---|---|"]
    out += [f"| {name} | `{digest}` |" for name, digest in sorted(prov.get("inputs", {}).items())]
    if body.strip():
        out += ["", "## Original model card", "", body.strip()]
    return "\n".join(front + out) + "\n"


VERIFY_HEADING = "## Verification (`hydracc verify`)"


def verification_section(verify: dict[str, Any]) -> list[str]:
    """The card's lines for a ``hydracc verify`` report (``VerifyReport.to_json()``)."""
    out = [VERIFY_HEADING, ""]
    if verify.get("data"):
        out += [f"Against the original on {verify['data']} ({verify.get('device', '?')}): "
                f"{'passed' if verify.get('passed') else 'failed'}.", ""]
    out += ["| check | value | threshold | ok |", "|---|---|---|---|"]
    for name, row in sorted(verify.get("checks", {}).items()):
        value = row.get("value")
        shown = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        ok = "not judged" if not row.get("judged", True) else "yes" if row.get("ok") else "no"
        out.append(f"| {name} | {shown} | {row.get('threshold')} | {ok} |")
    return out


def with_verification(card: str, verify: dict[str, Any]) -> str:
    """``card`` (a hydracc card) with its verification section replaced by ``verify``'s figures,
    placed before "How to load"; the rest, the original model card included, is kept as it is."""
    lines = card.split("\n")
    if VERIFY_HEADING in lines:  # drop the old section, up to the next heading of the same level
        start = lines.index(VERIFY_HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = lines[:start] + lines[end:]
        while start > 0 and start < len(lines) and lines[start - 1] == "" and lines[start] == "":
            del lines[start]
    at = lines.index("## How to load") if "## How to load" in lines else len(lines)
    return "\n".join(lines[:at] + verification_section(verify) + [""] + lines[at:])
