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


def _printable(value: Any) -> str:
    """``str(value)`` on one line: control characters, line breaks and undecodable bytes (surrogates) become U+FFFD."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in str(value))


def _yaml_scalar(value: Any) -> str:
    """A double-quoted YAML scalar: a JSON string (valid YAML) whose characters YAML cannot hold raw (DEL, C1
    controls, line separators) are escaped; undecodable bytes (surrogates) become U+FFFD."""
    text = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in str(value))
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"
                   for ch in json.dumps(text, ensure_ascii=False))


_MD_ESCAPE = re.compile(r"([\\`*_\[\]()#|~!{}])")
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+=-]*")


def md_text(value: Any) -> str:
    """``value`` as inert Markdown text on one line: no HTML, links, emphasis, code or headings can come of it."""
    text = _printable(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_ESCAPE.sub(r"\\\1", text)


def md_code(value: Any) -> str:
    """``value`` in a code span when it is a plain identifier (a Hub id, a module path), else as ``md_text``."""
    text = _printable(value)
    return f"`{text}`" if len(text) <= 256 and _PLAIN_ID.fullmatch(text) else md_text(text)


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

    model_type = md_text(config.get("model_type", "?"))
    full = sum(k == "full" for entry in layers for k in entry["kinds"])
    heads = sum(len(entry["kinds"]) for entry in layers)
    ratio = kv_bytes_per_token_after / kv_bytes_per_token_before if kv_bytes_per_token_before else 1.0
    out = [
        f"# {model_type} with hybrid attention (hydracc)",
        "",
        f"A {model_type} checkpoint{f' converted from {md_code(base)}' if base else ''} by hydracc "
        f"{md_text(hydra.get('provenance', {}).get('hydracc_version', '?'))}: {full} of {heads} attention heads keep full softmax "
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
    out += ["", "## How the plan was chosen", "", *_plan_section(plan, budget)]
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
    out.append(f"hydracc {md_text(prov.get('hydracc_version', '?'))}, torch {md_text(prov.get('torch', '?'))}, "
               f"transformers {md_text(prov.get('transformers', '?'))}; passes: {md_text(', '.join(hydra.get('passes', [])))}.")
    out += ["", "| input file | sha256 |", "|---|---|"]
    out += [f"| {md_text(name)} | {md_code(digest)} |" for name, digest in sorted(prov.get("inputs", {}).items())]
    if body.strip():
        out += ["", ORIGINAL_HEADING, "", body.strip()]
    return "\n".join(front + out) + "\n"


def _plan_counts(plan: dict[str, Any]) -> tuple[int, int, str]:
    """Full units, all units and the unit's name, counted from the plan's heads (never from its budget record)."""
    grouped = plan.get("unit") == "kv_group"
    full = total = 0
    for lp in plan.get("layers", []):
        kinds = [h.get("kind") for h in lp.get("heads", [])]
        keeps = [kind_by_name(k).keeps_kv for k in kinds]
        if grouped:
            group = max(1, len(kinds) // max(1, lp.get("num_kv_heads", 1)))
            total += lp.get("num_kv_heads", 0)
            full += sum(any(keeps[g:g + group]) for g in range(0, len(keeps), group))
        else:
            total += len(kinds)
            full += sum(keeps)
    return full, total, "KV group" if grouped else "head"


def _plan_section(plan: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    """How the plan was made: the counts from the plan itself, then what the budget record says of the choice."""
    if not plan.get("layers"):
        return ["Converted by a plan file given by hand."]
    full, total, unit = _plan_counts(plan)
    kept = f"{full} of {total} {unit}s kept full"
    if not budget or "strategy" not in budget:
        edited = " (edited after planning: its recorded budget no longer described it and was dropped)" \
            if budget.get("edited") else ""
        return [f"Converted by a plan file given by hand{edited}: {kept}."]
    how = md_text(budget["strategy"]) + (f" by {md_code(budget['score'])}" if "score" in budget else "")
    asked = (f"full ratio {md_text(budget['full_ratio'])}" if budget.get("full_ratio") is not None
             else f"KV budget {md_text(budget.get('kv_budget'))}")
    source = " (from the plan file)" if budget.get("source") == "plan_file" else ""
    out = [f"Strategy {how}{source}, {asked}: {kept}."]
    if budget.get("objective"):
        out.append(f"Objective {md_code(budget['objective'])}"
                   + (" (recall first, then output KL)" if budget["objective"] == "recall" else "")
                   + ("; the model failed its recall probes, so output KL decided" if budget.get("objective_fell_back_to_kl")
                      else "") + ".")
    decided = budget.get("full_decided_by") or {}
    if decided:
        units_are = " (each KV group named by its first query head, layer.head)." if plan.get("unit") == "kv_group" else "."
        out.append("Full units decided by: "
                   + "; ".join(f"{md_code(how)} ({', '.join(map(md_text, units))})" for how, units in sorted(decided.items()))
                   + units_are)
    score = budget.get("score")
    full_heads = [(lp["layer"], h, head.get("scores", {})) for lp in plan.get("layers", [])
                  for h, head in enumerate(lp.get("heads", [])) if head.get("kind") == "full"]
    columns = [c for c in dict.fromkeys(("recall", score)) if c and any(c in scores for _, _, scores in full_heads)]
    rows = [(layer, h, [scores.get(c) for c in columns]) for layer, h, scores in full_heads] if columns else []
    if rows and any(v is not None for _, _, vals in rows for v in vals):
        out += ["", "| layer.head (original order) | " + " | ".join(map(md_text, columns)) + " |",
                "|---|" + "---|" * len(columns)]
        out += [f"| {layer}.{h} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals) + " |" for layer, h, vals in rows]
    return out


VERIFY_HEADING = "## Verification (`hydracc verify`)"
VERIFY_BEGIN = "<!-- hydracc verify: begin -->"
VERIFY_END = "<!-- hydracc verify: end -->"
"""The verification section sits between these lines, so an update replaces only what hydracc wrote."""
ORIGINAL_HEADING = "## Original model card"
"""Everything from the first line that is exactly this one on is the input's card, never edited."""


def verification_section(verify: dict[str, Any]) -> list[str]:
    """The card's lines for a ``hydracc verify`` report (``VerifyReport.to_json()``), between the markers."""
    out = [VERIFY_BEGIN, VERIFY_HEADING, ""]
    if verify.get("data"):
        out += [f"Against the original on {md_text(verify['data'])} ({md_text(verify.get('device', '?'))}): "
                f"{'passed' if verify.get('passed') else 'failed'}.", ""]
    out += ["| check | value | threshold | ok |", "|---|---|---|---|"]
    for name, row in sorted(verify.get("checks", {}).items()):
        value = row.get("value")
        shown = "-" if value is None else f"{value:.4g}" if isinstance(value, float) else md_text(value)
        ok = "not judged" if not row.get("judged", True) else "yes" if row.get("ok") else "no"
        out.append(f"| {md_text(name)} | {shown} | {md_text(row.get('threshold'))} | {ok} |")
    return out + [VERIFY_END]


def with_verification(card: str, verify: dict[str, Any]) -> str:
    """``card`` (a hydracc card) with its verification section replaced by ``verify``'s figures,
    placed before "How to load". Only hydracc's part of the card (above the original model card) is
    searched, and only the lines between the markers are replaced; the rest is kept as it is."""
    lines = card.split("\n")
    cut = lines.index(ORIGINAL_HEADING) if ORIGINAL_HEADING in lines else len(lines)
    ours, kept = lines[:cut], lines[cut:]
    if VERIFY_BEGIN in ours:
        start = ours.index(VERIFY_BEGIN)
        if VERIFY_END not in ours[start:]:
            raise ValueError(f"the card has {VERIFY_BEGIN!r} without {VERIFY_END!r}: it was edited by hand")
        end = ours.index(VERIFY_END, start) + 1
        ours = ours[:start] + ours[end + 1 if end < len(ours) and ours[end] == "" else end:]
    elif VERIFY_HEADING in ours:  # a card written before the markers: its section ends at hydracc's next heading
        start = ours.index(VERIFY_HEADING)
        end = next((i for i in range(start + 1, len(ours)) if ours[i].startswith("## ")), len(ours))
        ours = ours[:start] + ours[end:]
    at = ours.index("## How to load") if "## How to load" in ours else len(ours)
    return "\n".join(ours[:at] + verification_section(verify) + [""] + ours[at:] + kept)
