"""Hostile plan files: every one fails with PlanError (exit 2) and a message naming the field, fast.

The parser is also fuzzed with hypothesis (random bytes, and valid plans with one field mutated):
it may accept or refuse, but never raises anything but PlanError and never takes a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydracc.errors import PlanError
from hydracc.frontend.capture import AttentionSite
from hydracc.planning.budget import ratio_plan
from hydracc.planning.plan import MAX_PLAN_BYTES, load_plan, plan_from_json, plan_from_text


def _valid(kind: str = "streaming") -> dict:
    sites = [AttentionSite(i, f"model.layers.{i}.self_attn", f"sdpa_{i}", 4, 2, 8, 8**-0.5, True) for i in range(2)]
    return ratio_plan(sites, "llama", full_ratio=0.5, linear_kind=kind).to_json()


def _stream_head(doc: dict) -> dict:
    return next(h for lp in doc["layers"] for h in lp["heads"] if h["kind"] == "streaming")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: _stream_head(d)["params"].update(window=2**63), "params.window"),
        (lambda d: _stream_head(d)["params"].update(sink=2**62), "params.sink"),
        (lambda d: _stream_head(d)["params"].update(window=0), "params.window"),
        (lambda d: d.update(version=-7), "plan.version"),
        (lambda d: d.update(version=0), "plan.version"),
        (lambda d: d.update(version=True), "plan.version"),
        (lambda d: d.update(model={"blob": "x" * 100_000}), "plan.model"),
        (lambda d: d.update(budget={"blob": ["y"] * 50_000}), "plan.budget"),
        (lambda d: _stream_head(d).update(scores={f"s{i}": 1.0 for i in range(1000)}), "scores"),
        (lambda d: _stream_head(d).update(scores={"huge": 10**400}), "scores"),
    ],
)
def test_hostile_fields_are_refused_by_name(edit, field: str) -> None:
    doc = _valid()
    edit(doc)
    with pytest.raises(PlanError, match="invalid plan: .*" + field.replace(".", r"\.")):
        plan_from_json(doc)


def test_nan_is_not_json(tmp_path: Path) -> None:
    text = json.dumps(_valid()).replace('"params": {}', '"params": {}, "scores": {"kl": NaN}', 1)
    with pytest.raises(PlanError, match="not valid JSON: NaN"):
        plan_from_text(text)


def test_not_utf8_deep_nesting_and_endless_files(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.json"
    bad.write_bytes(json.dumps(_valid()).encode() + b"\xff\xfe")
    with pytest.raises(PlanError, match="not UTF-8"):
        load_plan(bad)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PlanError, match="nests too deeply"):
        load_plan(deep)
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(MAX_PLAN_BYTES + 10)
    with pytest.raises(PlanError, match="larger than"):
        load_plan(big)
    start = time.perf_counter()
    with pytest.raises(PlanError):
        load_plan("/dev/urandom")  # never ends on its own: read only up to the limit
    assert time.perf_counter() - start < 30
    with pytest.raises(PlanError, match="cannot read plan file"):
        load_plan(tmp_path)  # a folder


def _check_fast(fn) -> None:
    start = time.process_time()  # this process's CPU time: another process's load cannot fail it
    try:
        fn()
    except PlanError:
        pass
    assert time.process_time() - start < 1.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    def parse() -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return
        plan_from_text(text)

    _check_fast(parse)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["streaming", "elu", "hedgehog"]), st.data())
def test_fuzz_mutated_valid_plans(kind: str, data: st.DataObject) -> None:
    doc = _valid(kind)
    # walk to a random container inside the plan and replace, drop or add one entry
    node: object = doc
    for _ in range(data.draw(st.integers(0, 5))):
        children = list(node.values()) if isinstance(node, dict) else list(node) if isinstance(node, list) else []
        children = [c for c in children if isinstance(c, (dict, list))]
        if not children:
            break
        node = data.draw(st.sampled_from(children))
    value = data.draw(_JSON_VALUES)
    if isinstance(node, dict) and node:
        key = data.draw(st.sampled_from(sorted(node)) | st.text(max_size=8))
        if data.draw(st.booleans()):
            node[key] = value
        else:
            node.pop(key, None)
    elif isinstance(node, list) and node:
        i = data.draw(st.integers(0, len(node) - 1))
        node[i] = value
    _check_fast(lambda: plan_from_text(json.dumps(doc)))
