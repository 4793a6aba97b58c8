"""The conversion plan: which heads of which layer stay full and which become linear.

Design decisions:
- A plan is plain data (dataclasses) with a versioned JSON form. Every query head has
  an entry ``{"kind": NAME, "params": {...}}`` so later, learned kinds can carry
  per-head parameters without a format change; ``kind`` names come from
  ``hydracc.kernels.kinds``.
- Validation happens on load and against the captured model, and every error names
  the offending field as a JSON path (``plan.layers[1].heads[5].kind``).
- Planning (which heads to keep full under a budget) lives in ``hydracc.planning.budget``; this
  module is the format, its validation and the cache accounting. The unit is the KV
  group whenever KV heads are shared, because only a whole linear KV group frees cache.
- Per-head ``scores`` (from the analysis) ride along in the JSON so a plan explains
  itself; conversion ignores them.
- KV-cache accounting is per token: a KV head must be cached if any query head using
  it keeps KV (``HeadKind.keeps_kv``). Streaming heads keep a fixed window (counted with
  the linear states as per-sequence bytes), linear heads a fixed state.
- ``fusion`` (plan level): linear heads get scale-normalized fusion and the layer gets
  learned parameters. Plans with a learned kind (hedgehog, gdn) always have them, since
  those kinds need parameters anyway; the parameter list and fusion come together.
- Streaming heads carry ``{"sink": S, "window": W}``; missing values take
  ``STREAMING_DEFAULTS`` when the plan is read, so a loaded plan is always complete.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydracc.errors import PlanError
from hydracc.frontend.capture import AttentionSite
from hydracc.frontend.checkpoint import refuse_json_constant
from hydracc.kernels.kinds import KIND_NAMES, STREAMING, kind_by_name

PLAN_FORMAT = "hydracc-plan"
PLAN_VERSION = 1
STREAMING_DEFAULTS = dict(STREAMING.plan_defaults)
"""Sink tokens and window length of a streaming head when the plan does not say (``kinds.streaming``)."""
MAX_PLAN_BYTES = 64 * 2**20
"""Largest plan file read (a plan is about 100 bytes per head; this leaves room for a million heads)."""
MAX_BLOB_BYTES = 64 * 2**10
"""Largest free-form ``model`` / ``budget`` object; both are copied into the converted config."""
MAX_SCORES = 64
"""Most scores per head (the analysis writes about ten)."""


@dataclass
class HeadPlan:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    """What the analysis measured for this head (informational; conversion ignores it)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "params": self.params}
        if self.scores:
            out["scores"] = self.scores
        return out


@dataclass
class LayerPlan:
    layer: int
    module: str
    num_heads: int
    num_kv_heads: int
    heads: list[HeadPlan]

    @property
    def kinds(self) -> list[str]:
        return [h.kind for h in self.heads]

    def full_heads(self) -> list[int]:
        """Heads that keep softmax attention over every key (they keep the KV cache)."""
        return [i for i, h in enumerate(self.heads) if kind_by_name(h.kind).keeps_kv]

    def has_learned_kind(self) -> bool:
        return any(kind_by_name(h.kind).learned for h in self.heads)

    def has_linear_kind(self) -> bool:
        return any(kind_by_name(h.kind).linear for h in self.heads)

    def head_windows(self) -> list[int]:
        """The op's ``head_windows`` argument: ``[sink, window]`` per head, or ``[]`` without streaming heads."""
        windowed = [kind_by_name(h.kind).windowed for h in self.heads]
        if not any(windowed):
            return []
        out: list[int] = []
        for h, w in zip(self.heads, windowed, strict=True):
            out += [int(h.params["sink"]), int(h.params["window"])] if w else [0, 0]
        return out

    def cached_kv_heads(self) -> list[int]:
        """KV heads whose keys and values must still be cached."""
        group = self.num_heads // self.num_kv_heads
        return [
            g
            for g in range(self.num_kv_heads)
            if any(kind_by_name(self.heads[g * group + i].kind).keeps_kv for i in range(group))
        ]


@dataclass
class Plan:
    layers: list[LayerPlan]
    model: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    unit: str = "head"
    fusion: bool = False
    """Scale-normalized fusion (and learned parameters) for every layer with linear heads."""

    def layer_has_params(self, lp: LayerPlan) -> bool:
        """Whether layer ``lp`` gets learned parameters (fusion scales, feature maps, gates)."""
        return lp.has_learned_kind() or (self.fusion and lp.has_linear_kind())

    def layer(self, index: int) -> LayerPlan:
        for lp in self.layers:
            if lp.layer == index:
                return lp
        raise KeyError(index)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "unit": self.unit,
            "budget": self.budget,
            "fusion": self.fusion,
            "layers": [
                {
                    "layer": lp.layer,
                    "module": lp.module,
                    "num_heads": lp.num_heads,
                    "num_kv_heads": lp.num_kv_heads,
                    "heads": [h.to_json() for h in lp.heads],
                }
                for lp in self.layers
            ],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: float) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an integer beyond float range
        return False


def _field(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise PlanError(f"invalid plan: {path}: {message}")


def plan_from_json(doc: Any) -> Plan:
    """Parse and validate a plan document (the dict form of the JSON)."""
    _field(isinstance(doc, dict), "plan", "must be a JSON object")
    _field(doc.get("format") == PLAN_FORMAT, "plan.format", f"must be {PLAN_FORMAT!r}, got {doc.get('format')!r}")
    version = doc.get("version")
    _field(_is_int(version) and version >= 1, "plan.version", f"must be an integer from 1 to {PLAN_VERSION}, got {version!r}")
    _field(version <= PLAN_VERSION, "plan.version", f"{version} is newer than this hydracc understands ({PLAN_VERSION}); upgrade hydracc")
    layers = doc.get("layers")
    _field(isinstance(layers, list) and bool(layers), "plan.layers", "must be a non-empty list")
    out: list[LayerPlan] = []
    seen: set[int] = set()
    for i, raw in enumerate(layers):
        path = f"plan.layers[{i}]"
        _field(isinstance(raw, dict), path, "must be an object")
        layer = raw.get("layer")
        _field(_is_int(layer) and layer >= 0, f"{path}.layer", "must be a non-negative integer")
        _field(layer not in seen, f"{path}.layer", f"layer {layer} appears twice")
        seen.add(layer)
        nh, nkv = raw.get("num_heads"), raw.get("num_kv_heads")
        _field(_is_int(nh) and nh > 0, f"{path}.num_heads", "must be a positive integer")
        _field(_is_int(nkv) and nkv > 0 and nh % nkv == 0, f"{path}.num_kv_heads", f"must be a positive divisor of num_heads ({nh})")
        heads_raw = raw.get("heads")
        _field(isinstance(heads_raw, list), f"{path}.heads", "must be a list with one entry per query head")
        _field(len(heads_raw) == nh, f"{path}.heads", f"has {len(heads_raw)} entries but num_heads is {nh}")
        heads: list[HeadPlan] = []
        for h, entry in enumerate(heads_raw):
            hpath = f"{path}.heads[{h}]"
            if isinstance(entry, str):
                entry = {"kind": entry}
            _field(isinstance(entry, dict), hpath, "must be an object like {\"kind\": \"full\"}")
            kind = entry.get("kind")
            _field(kind in KIND_NAMES, f"{hpath}.kind", f"unknown head kind {kind!r}; known kinds: {', '.join(KIND_NAMES)}")
            params = entry.get("params", {})
            _field(isinstance(params, dict), f"{hpath}.params", "must be an object")
            allowed = kind_by_name(kind).plan_params
            unknown = sorted(set(params) - set(allowed))
            _field(
                not unknown,
                f"{hpath}.params",
                f"kind {kind!r} takes {'no parameters' if not allowed else 'only ' + ', '.join(allowed)}; got {', '.join(unknown)}",
            )
            scores = entry.get("scores", {})
            _field(
                isinstance(scores, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()),
                f"{hpath}.scores",
                "must be an object of numbers",
            )
            _field(len(scores) <= MAX_SCORES and all(len(str(k)) <= 64 for k in scores), f"{hpath}.scores",
                   f"at most {MAX_SCORES} scores with names of up to 64 characters")
            _field(all(_finite(v) for v in scores.values()), f"{hpath}.scores", "must be finite numbers (no NaN or infinity)")
            params = dict(params)
            head_kind = kind_by_name(kind)
            params = {**head_kind.plan_defaults, **params}
            for name, (low, high) in head_kind.plan_ranges.items():
                _field(_is_int(params[name]) and low <= params[name] <= high, f"{hpath}.params.{name}",
                       f"must be an integer from {low} to {high}, got {params[name]!r}")
            heads.append(HeadPlan(kind, params, {str(k): float(v) for k, v in scores.items()}))
        module = raw.get("module", "")
        _field(isinstance(module, str) and len(module) <= 1024, f"{path}.module",
               "must be the attention module's name (a string of at most 1024 characters)")
        out.append(LayerPlan(layer, module, nh, nkv, heads))
    unit = doc.get("unit", "head")
    _field(unit in ("head", "kv_group"), "plan.unit", "must be 'head' or 'kv_group'")
    model = doc.get("model", {})
    budget = doc.get("budget", {})
    _field(isinstance(model, dict), "plan.model", "must be an object")
    _field(isinstance(budget, dict), "plan.budget", "must be an object")
    for name, blob in (("model", model), ("budget", budget)):
        _field(len(json.dumps(blob)) <= MAX_BLOB_BYTES, f"plan.{name}",
               f"is larger than {MAX_BLOB_BYTES // 1024} KiB; it is copied into the converted config, so keep it short")
    check_budget(budget)
    _check_model(model)
    fusion = doc.get("fusion", False)
    _field(isinstance(fusion, bool), "plan.fusion", "must be true or false")
    return Plan(sorted(out, key=lambda lp: lp.layer), model, budget, unit, fusion)


# --- the free-form blocks: ``budget`` is hydracc's record of how the plan was made -----------------------
# Every field the planner writes has a checker; anything else is refused, so what reaches the converted
# config, the model card and the plot is typed and bounded (the card escapes text on top of this).

Check = Any  # a function (value, path) -> None that raises PlanError


def _text(limit: int = 512) -> Check:
    def check(v: Any, path: str) -> None:
        _field(isinstance(v, str) and len(v) <= limit and v.isprintable(), path,
               f"must be a single line of printable text of at most {limit} characters")
    return check


def _choice(options: Sequence[str]) -> Check:
    def check(v: Any, path: str) -> None:
        _field(v in options, path, f"must be one of {', '.join(map(repr, options))}, got {str(v)[:80]!r}")
    return check


def _number(low: float, high: float) -> Check:
    def check(v: Any, path: str) -> None:
        _field(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v) and low <= v <= high, path,
               f"must be a number from {low:g} to {high:g}, got {str(v)[:80]!r}")
    return check


def _integer(low: int = 0, high: int = 2**62) -> Check:
    def check(v: Any, path: str) -> None:
        _field(_is_int(v) and low <= v <= high, path, f"must be an integer from {low} to {high}, got {str(v)[:80]!r}")
    return check


def _unit_name(v: Any, path: str) -> None:
    _field(isinstance(v, str) and len(v) <= 24 and _UNIT_NAME.fullmatch(v) is not None, path,
           f"must name a unit as layer.head (e.g. '3.5'), got {str(v)[:80]!r}")


def _list_of(item: Check, limit: int = 4096) -> Check:
    def check(v: Any, path: str) -> None:
        _field(isinstance(v, list) and len(v) <= limit, path, f"must be a list of at most {limit} items")
        for i, x in enumerate(v):
            item(x, f"{path}[{i}]")
    return check


def _record(fields: dict[str, Check]) -> Check:
    def check(v: Any, path: str) -> None:
        _field(isinstance(v, dict), path, "must be an object")
        for key, value in v.items():
            _field(key in fields, f"{path}.{str(key)[:40]}",
                   f"unknown field (known: {', '.join(fields)})")
            if value is not None:
                fields[key](value, f"{path}.{key}")
    return check


def _mapping(key: Check, value: Check) -> Check:
    def check(v: Any, path: str) -> None:
        _field(isinstance(v, dict) and len(v) <= 64, path, "must be an object of at most 64 fields")
        for k, x in v.items():
            key(k, f"{path} key")
            value(x, f"{path}.{k}")
    return check


_UNIT_NAME = re.compile(r"\d{1,6}\.\d{1,6}")
_STRATEGIES = ("heads", "layers", "random", "even")
_BUDGET_FIELDS: dict[str, Check] = {
    "strategy": _choice(_STRATEGIES),
    "full_ratio": _number(0, 1),
    "kv_budget": _number(0, 1),
    "linear_kind": _choice(KIND_NAMES),
    "linear_kind_params": _mapping(_choice(("sink", "window")), _integer()),
    "full_units": _integer(),
    "total_units": _integer(),
    "kv_fraction_used": _number(0, 1),
    "min_full_per_layer": _integer(),
    "max_full_per_layer": _integer(),
    "keep_full": _list_of(_unit_name),
    "force_linear": _list_of(_unit_name),
    "score": _choice(("sensitivity", "retrieval", "linear_error")),
    "objective": _choice(("recall", "kl")),
    "objective_fell_back_to_kl": _text(),
    "full_decided_by": _mapping(_choice(("recall", "kl", "joint")), _list_of(_unit_name)),
    "stability": _record({
        "agree": _number(0, 1), "resamples": _integer(),
        "margin": _record({"kept": _unit_name, "dropped": _unit_name, "score": _text(), "kept_value": _number(-1e300, 1e300),
                           "dropped_value": _number(-1e300, 1e300), "relative": _number(-1e300, 1e300)}),
    }),
    "seed": _integer(),
    "calibration": _record({"source": _text(1024), "samples": _integer(), "seq_len": _integer()}),
    "source": _choice(("plan_file",)),
    "edited": lambda v, path: _field(isinstance(v, bool), path, "must be true or false"),
}
_MODEL_FIELDS: dict[str, Check] = {
    "model_type": _text(128),
    "num_layers": _integer(),
    "num_heads": _list_of(_integer(), 64),
    "num_kv_heads": _list_of(_integer(), 64),
    "head_dim": _list_of(_integer(), 64),
}


def check_budget(budget: Any) -> None:
    """Validate a plan's ``budget`` record (types, ranges, known fields); raises ``PlanError``."""
    _record(_BUDGET_FIELDS)(budget, "plan.budget")


def _check_model(model: Any) -> None:
    _record(_MODEL_FIELDS)(model, "plan.model")


def count_units(plan: Plan, sites: Sequence[AttentionSite], element_bytes: int = 2) -> dict[str, Any]:
    """What a plan keeps, counted from its heads: full units of all units (KV groups when the model shares KV
    heads, else heads) and the share of the KV-cache bytes kept."""
    grouped = any(s.num_kv_heads < s.num_heads for s in sites)
    full = total = 0
    for lp in plan.layers:
        if grouped:
            full += len(lp.cached_kv_heads())
            total += lp.num_kv_heads
        else:
            full += len(lp.full_heads())
            total += lp.num_heads
    cost = cache_cost(plan, sites, element_bytes)
    return {"unit": "kv_group" if grouped else "head", "full_units": full, "total_units": total,
            "kv_fraction_used": round(cost.ratio, 6)}


def _names_agree(plan: Plan, budget: dict[str, Any], *, grouped: bool) -> bool:
    """Whether the units a budget record names (``layer.head``) are full or linear as the plan's heads say."""
    def unit(name: str, lp_by_layer: dict[int, LayerPlan]) -> str | None:
        layer, head = (int(x) for x in name.split("."))
        lp = lp_by_layer.get(layer)
        if lp is None or head >= lp.num_heads:
            return None
        group = lp.num_heads // lp.num_kv_heads if grouped else 1
        return f"{layer}.{head // group * group}"

    by_layer = {lp.layer: lp for lp in plan.layers}
    full = set()
    for lp in plan.layers:
        group = lp.num_heads // lp.num_kv_heads if grouped else 1
        full |= {f"{lp.layer}.{h // group * group}" for h in lp.full_heads()}
    decided = [n for names in (budget.get("full_decided_by") or {}).values() for n in names]  # keep-full units are not listed
    margin = (budget.get("stability") or {}).get("margin") or {}
    checks = [
        all(unit(n, by_layer) in full for n in decided),
        all(unit(n, by_layer) in full for n in budget.get("keep_full") or []),
        all(unit(n, by_layer) not in full for n in budget.get("force_linear") or []),
        "kept" not in margin or unit(margin["kept"], by_layer) in full,
        "dropped" not in margin or unit(margin["dropped"], by_layer) not in full,
    ]
    return all(checks)


def with_counted_budget(plan: Plan, sites: Sequence[AttentionSite], element_bytes: int = 2) -> Plan:
    """A plan read from a file, with its budget record recomputed from its heads: the record is kept only when
    its counts and the units it names (decided-by lists, --keep-full, --force-linear, the stability margin) still
    describe the plan; else the plan was edited after planning, and only the counts stay."""
    counted = count_units(plan, sites, element_bytes)
    unit = counted.pop("unit")
    recorded = plan.budget
    same = bool(recorded) and all(recorded.get(k) == counted[k] for k in ("full_units", "total_units")) \
        and _names_agree(plan, recorded, grouped=unit == "kv_group")
    plan.unit = unit
    plan.budget = {**recorded, **counted, "source": "plan_file"} if same else {**counted, "source": "plan_file",
                                                                              "edited": bool(recorded)}
    return plan


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan JSON file (UTF-8, at most ``MAX_PLAN_BYTES``; devices and pipes are read up to that)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise PlanError(f"cannot read plan file {p}: {exc.strerror or exc}", hint="give the path of a plan JSON written by --plan-out") from exc
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"plan file {p} is larger than {MAX_PLAN_BYTES // 2**20} MiB, so it is not a plan",
                        hint="give the path of a plan JSON written by --plan-out")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"plan file {p} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})",
                        hint="a plan is a JSON file, as --plan-out writes it") from exc
    return plan_from_text(text, str(p))


def plan_from_text(text: str, where: str = "plan") -> Plan:
    """Parse and validate a plan from its JSON text; ``where`` names it in errors."""
    try:
        doc = json.loads(text, parse_constant=refuse_json_constant)
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan file {where} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError:
        raise PlanError(f"plan file {where} nests too deeply to be a plan", hint="a plan is a JSON file, as --plan-out writes it") from None
    except ValueError as exc:  # NaN / Infinity, which are not JSON
        raise PlanError(f"plan file {where} is not valid JSON: {exc}") from exc
    return plan_from_json(doc)


def check_plan_fits(plan: Plan, sites: Sequence[AttentionSite], max_positions: int | None = None) -> None:
    """Raise ``PlanError`` unless the plan covers exactly the model's attention sites and its windows
    (sink + window) fit in the model's ``max_positions`` (a longer one would only size a cache no
    sequence can fill)."""
    by_layer = {s.layer: s for s in sites}
    for i, lp in enumerate(plan.layers):
        path = f"plan.layers[{i}]"
        site = by_layer.get(lp.layer)
        _field(site is not None, f"{path}.layer", f"layer {lp.layer} does not exist (the model has layers {sorted(by_layer)})")
        assert site is not None
        _field(lp.num_heads == site.num_heads, f"{path}.num_heads", f"is {lp.num_heads} but layer {lp.layer} ({site.module}) has {site.num_heads} query heads")
        _field(lp.num_kv_heads == site.num_kv_heads, f"{path}.num_kv_heads", f"is {lp.num_kv_heads} but layer {lp.layer} ({site.module}) has {site.num_kv_heads} KV heads")
        _field(lp.module in ("", site.module), f"{path}.module", f"is {lp.module[:80]!r} but layer {lp.layer} is {site.module!r}")
        if max_positions is not None:
            for h, head in enumerate(lp.heads):
                if kind_by_name(head.kind).windowed:
                    span = int(head.params["sink"]) + int(head.params["window"])
                    _field(span <= max_positions, f"{path}.heads[{h}].params",
                           f"sink + window is {span}, more than the model's {max_positions} positions "
                           "(a head that sees every position is a full head: use kind 'full', or a shorter window)")
    missing = sorted(set(by_layer) - {lp.layer for lp in plan.layers})
    _field(not missing, "plan.layers", f"has no entry for layer(s) {missing}; list every layer (all-full layers too)")


def model_summary(sites: Sequence[AttentionSite], model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "num_layers": len(sites),
        "num_heads": sorted({s.num_heads for s in sites}),
        "num_kv_heads": sorted({s.num_kv_heads for s in sites}),
        "head_dim": sorted({s.head_dim for s in sites}),
    }


@dataclass(frozen=True)
class CacheCost:
    """KV-cache bytes per token, and fixed bytes per sequence (linear states, streaming windows), for a plan."""

    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    linear_state_bytes: int

    @property
    def ratio(self) -> float:
        return self.kv_bytes_per_token_after / self.kv_bytes_per_token_before if self.kv_bytes_per_token_before else 1.0


def cache_cost(plan: Plan, sites: Sequence[AttentionSite], element_bytes: int) -> CacheCost:
    """What the plan does to the KV cache (keys + values, ``element_bytes`` each)."""
    by_layer = {s.layer: s for s in sites}
    before = after = state = 0
    for lp in plan.layers:
        d = by_layer[lp.layer].head_dim
        before += 2 * lp.num_kv_heads * d * element_bytes
        after += 2 * len(lp.cached_kv_heads()) * d * element_bytes
        for h in lp.heads:
            kind = kind_by_name(h.kind)
            if kind.state_shapes is not None:  # fp32 state tensors, as the kind declares them
                state += sum(math.prod(shape) for shape in kind.state_shapes(1, 1, d, d)) * 4
        # streaming heads: the hybrid cache keeps, for every KV head they read, the layer's largest
        # sink plus its largest window (at most; one row less between steps)
        group = lp.num_heads // lp.num_kv_heads
        streaming = [(i, h) for i, h in enumerate(lp.heads) if kind_by_name(h.kind).windowed]
        if streaming:
            rows = max(int(h.params["sink"]) for _, h in streaming) + max(int(h.params["window"]) for _, h in streaming)
            state += len({i // group for i, _ in streaming}) * rows * 2 * d * element_bytes
    return CacheCost(before, after, state)
