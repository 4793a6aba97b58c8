"""Fuzz: whatever a plan file's budget or a user's names hold, the card is inert Markdown and valid YAML.

A budget record either fails validation with a ``PlanError`` naming its field, or, once accepted,
gives a card whose text has no HTML, no link, no heading and no line of its own; names from the
command line (``--base-model``) and from the input card come back from the YAML front matter as
printable text.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydracc.emit.model_card import build_model_card, md_text, split_card
from hydracc.errors import PlanError
from hydracc.planning.plan import plan_from_json

HOSTILE = st.sampled_from(["<script>alert(1)</script>", "[x](javascript:alert(1))", "\n## Fake section\n", "`code`",
                           "![img](http://x/y.png)", "<img src=x onerror=alert(1)>", "a|b|c", "**bold**", "\x7f\x85\u2028",
                           "\udcff\udcfe", "&lt;", "\\", "# h", "-->", "<!-- hydracc verify: begin -->", "javascript:alert(1)"])
TEXT = st.one_of(HOSTILE, st.text(max_size=40), st.builds(lambda a, b: a + b, HOSTILE, st.text(max_size=10)))
VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False), TEXT),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                     max_leaves=8)
KEYS = st.sampled_from(["strategy", "full_ratio", "kv_budget", "linear_kind", "full_units", "total_units", "kv_fraction_used",
                        "score", "objective", "objective_fell_back_to_kl", "full_decided_by", "stability", "seed",
                        "calibration", "keep_full", "source", "edited"])


def _plan(budget: dict) -> dict:
    heads = [{"kind": "full"}, {"kind": "full"}, {"kind": "elu"}, {"kind": "elu"}]
    return {"format": "hydracc-plan", "version": 1, "unit": "kv_group", "model": {"model_type": "llama"}, "budget": budget,
            "layers": [{"layer": 0, "module": "model.layers.0.self_attn", "num_heads": 4, "num_kv_heads": 2,
                        "heads": heads}]}


def _config(plan: dict) -> dict:
    return {"model_type": "llama", "hydra": {
        "format_version": 1, "plan": plan, "passes": ["hybridize"], "distill": {},
        "layers": [{"layer": 0, "module": "model.layers.0.self_attn", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
                    "scale": 0.35, "kinds": ["full", "full", "elu", "elu"], "head_order": [0, 1, 2, 3],
                    "head_windows": [], "params": []}],
        "provenance": {"hydracc_version": "0.1.0", "inputs": {"model.safetensors": "ab" * 32}}}}


SIZES = {"kv_bytes_per_token_before": 64, "kv_bytes_per_token_after": 32, "state_bytes_per_sequence": 512}
_LINK = re.compile(r"(?<!\\)\[[^\]]*(?<!\\)\]\(")


def _inert(card: str) -> None:
    """No raw HTML, no link syntax, no heading but hydracc's, in the part of the card hydracc wrote."""
    ours = card.split("## Original model card")[0]
    body = ours.split("---\n", 2)[2]
    assert "<script" not in body.lower() and "<img" not in body.lower() and "<!-- hydracc" not in body
    assert not _LINK.search(body), body
    headings = [line for line in body.split("\n") if line.startswith("#")]
    assert all(h.startswith(("# llama with hybrid", "## ")) for h in headings), headings
    assert all(h in ("## Plan", "## Head kinds", "## How the plan was chosen", "## Added parameters", "## How to load",
                     "## Provenance") for h in headings if h.startswith("## ")), headings


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.one_of(KEYS, TEXT), VALUE, max_size=5))
def test_any_budget_is_refused_or_rendered_inert(budget: dict) -> None:
    doc = _plan(budget)
    try:
        plan = plan_from_json(copy.deepcopy(doc))
    except PlanError as exc:
        assert "plan.budget" in str(exc) or "plan." in str(exc)
        return
    card = build_model_card(_config(plan.to_json()), **SIZES)
    _inert(card)
    yaml.safe_load(card.split("---\n")[1])


@settings(max_examples=200, deadline=None)
@given(TEXT, TEXT)
def test_names_in_the_front_matter_come_back_as_printable_text(base: str, license_: str) -> None:
    original = f"---\nlicense: {json.dumps(license_)}\n---\n# Base\n"
    card = build_model_card(_config(_plan({})), **SIZES, base_model=base, input_card=original)
    meta, _ = split_card(card)
    assert meta, card[:300]  # the front matter still parses
    assert meta["library_name"] == "transformers"
    if base:
        assert meta["base_model"] == ["".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in base)]
    assert isinstance(meta.get("license", ""), str)
    _inert(card)
    card.encode("utf-8")  # no lone surrogate reaches the file


@pytest.mark.parametrize("text", ["<b>x</b>", "[a](b)", "`c`", "a\nb", "x|y", "\x00"])
def test_md_text_is_one_inert_line(text: str) -> None:
    out = md_text(text)
    assert "\n" not in out and "<" not in out and "`" not in out.replace("\\`", "") and "|" not in out.replace("\\|", "")


PRINTABLE = st.one_of(HOSTILE, st.text(max_size=40)).filter(lambda t: t.isprintable() and len(t) <= 512)
VALID_BUDGET = st.fixed_dictionaries({"strategy": st.sampled_from(["heads", "layers", "random", "even"])}, optional={
    "full_ratio": st.floats(0, 1), "score": st.sampled_from(["sensitivity", "retrieval", "linear_error"]),
    "objective": st.sampled_from(["recall", "kl"]), "objective_fell_back_to_kl": PRINTABLE,
    "full_decided_by": st.dictionaries(st.sampled_from(["recall", "kl", "joint"]), st.lists(st.sampled_from(["0.0", "0.2"]))),
    "calibration": st.fixed_dictionaries({"source": PRINTABLE}),
    "stability": st.fixed_dictionaries({"agree": st.floats(0, 1)}, optional={"margin": st.fixed_dictionaries(
        {"kept": st.just("0.0"), "dropped": st.just("0.2"), "score": PRINTABLE})}),
    "full_units": st.integers(0, 9), "total_units": st.integers(0, 9)})


@settings(max_examples=200, deadline=None)
@given(VALID_BUDGET)
def test_an_accepted_budget_with_hostile_text_renders_inert(budget: dict) -> None:
    plan = plan_from_json(_plan(budget))  # free text is allowed where the planner writes it: it must not matter
    card = build_model_card(_config(plan.to_json()), **SIZES)
    _inert(card)
    assert "1 of 2 KV groups kept full" in card  # counted from the heads, whatever the record says
