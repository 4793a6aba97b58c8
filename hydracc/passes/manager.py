"""The pass manager: named passes over the captured fx graph, checked after each one.

Design decisions:
- A pass is a plain function ``fn(ctx: PassContext) -> None`` that edits
  ``ctx.graph_module`` in place (and may record weight edits); it is registered under a
  name with ``@register_pass`` so the CLI (``--pass NAME``) and Python callers run user
  passes exactly like built-in ones.
- After every pass the manager lints the graph, recompiles it and propagates fake
  tensors through it (shapes and dtypes, no data), so a pass that breaks the graph is
  named at once instead of surfacing as a wrong checkpoint later.
- A pass reports what it changed with ``ctx.count("what", n)``; the manager keeps the
  counts per pass name in ``PassManager.counts`` (``{"hybridize": {"sites_rewritten": 2,
  ...}, ...}``, every pass that ran appears, in run order, with ``{}`` if it counted
  nothing). ``HYDRACC_DEBUG_GRAPH=1`` prints each pass's counts and the graph after it.
- Hybrid-op calls are read and edited through ``hydracc.passes.HybridCall`` (never
  ``node.args`` by position); after each pass the manager checks every call through that
  view, so a pass that leaves one inconsistent is named with what is wrong.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from hydracc.errors import PassError
from hydracc.frontend.capture import CapturedModel
from hydracc.passes.hybrid_call import HybridCall, check_hybrid_calls, hybrid_calls
from hydracc.passes.weight_edits import WeightEdits
from hydracc.planning.plan import Plan

PassFn = Callable[["PassContext"], None]


@dataclass
class PassContext:
    """Everything a pass may read or change."""

    captured: CapturedModel
    plan: Plan | None = None
    weight_edits: WeightEdits = field(default_factory=WeightEdits)
    notes: list[str] = field(default_factory=list)
    """Human-readable remarks passes leave for the report (e.g. a skipped site)."""
    options: dict[str, Any] = field(default_factory=dict)
    added_params: dict[str, str] = field(default_factory=dict)
    """Learned parameters the rewrite added: checkpoint name -> graph-module buffer name."""
    pass_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """What passes changed over every run on this context: pass name -> counter -> count (``count``)."""
    current_pass: str | None = None
    """The name of the pass being run (set by ``PassManager``)."""
    _run_counts: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.captured.graph_module

    def count(self, what: str, n: int = 1) -> None:
        """Add ``n`` to counter ``what`` of the running pass (e.g. ``ctx.count("sites_rewritten")``).

        Outside a ``PassManager`` run the counts go under the name ``"<none>"``.
        """
        counts = self.pass_counts.setdefault(self.current_pass or "<none>", {})
        counts[what] = counts.get(what, 0) + int(n)
        if self._run_counts is not None:
            self._run_counts[what] = self._run_counts.get(what, 0) + int(n)

    def hybrid_calls(self) -> list[HybridCall]:
        """The graph's ``hybrid_attention`` calls as ``HybridCall`` views, in layer order."""
        return list(hybrid_calls(self.graph_module))


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    fn: PassFn
    description: str


_REGISTRY: dict[str, RegisteredPass] = {}


def register_pass(name: str, *, description: str = "") -> Callable[[PassFn], PassFn]:
    """Decorator: register ``fn`` as the pass ``name`` (a user pass may not reuse a built-in name)."""

    def decorate(fn: PassFn) -> PassFn:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.fn is not fn and existing.fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"a pass named {name!r} is already registered ({existing.fn.__module__})")
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = RegisteredPass(name, fn, doc)
        return fn

    return decorate


def get_pass(name: str) -> RegisteredPass:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise PassError(
            f"no pass named {name!r} is registered (known: {known})",
            hint="a pass defined in your own file is registered when the file is loaded: add --plugin FILE.py",
        ) from None


def registered_passes() -> list[RegisteredPass]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def check_graph(gm: fx.GraphModule) -> None:
    """Lint, recompile and propagate fake tensors through ``gm``; raise on any problem."""
    gm.graph.lint()
    gm.recompile()
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in inputs if v is not None])
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)


class PassManager:
    """Runs passes in order over a ``PassContext``, checking the graph after each."""

    def __init__(self, passes: Iterable[str | PassFn], *, check: bool = True) -> None:
        self.passes: list[RegisteredPass] = []
        for p in passes:
            if isinstance(p, str):
                self.passes.append(get_pass(p))
            else:
                self.passes.append(RegisteredPass(getattr(p, "__name__", repr(p)), p, ""))
        self.check = check
        self.ran: list[str] = []
        self.counts: dict[str, dict[str, int]] = {}
        """What each pass that ran changed: pass name -> counter -> count, in run order."""

    def run(self, ctx: PassContext) -> PassContext:
        debug = os.environ.get("HYDRACC_DEBUG_GRAPH") == "1"
        for p in self.passes:
            run_counts: dict[str, int] = {}
            ctx.current_pass, ctx._run_counts = p.name, run_counts
            ctx.pass_counts.setdefault(p.name, {})
            try:
                p.fn(ctx)
            except PassError:
                raise
            except Exception as exc:
                hint = (
                    "a pass that reads hybrid_attention arguments by position can use hydracc.passes.HybridCall instead"
                    if isinstance(exc, (IndexError, TypeError)) else None
                )
                raise PassError(f"pass {p.name!r} failed: {type(exc).__name__}: {exc}", hint=hint) from exc
            finally:
                ctx.current_pass, ctx._run_counts = None, None
            if self.check:
                check_hybrid_calls(ctx.graph_module, p.name)
                try:
                    check_graph(ctx.graph_module)
                except Exception as exc:
                    raise PassError(
                        f"pass {p.name!r} left a broken graph: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                        hint="run with HYDRACC_DEBUG_GRAPH=1 to print the graph after each pass; edit "
                        "hybrid_attention calls through hydracc.passes.HybridCall",
                    ) from exc
            self.ran.append(p.name)
            counts = self.counts.setdefault(p.name, {})
            for what, n in run_counts.items():  # a pass listed twice: its counts add up
                counts[what] = counts.get(what, 0) + n
            if debug:
                shown = ", ".join(f"{k}={v}" for k, v in counts.items()) or "nothing counted"
                print(f"--- counts after pass {p.name}: {shown} ---", file=sys.stderr)
                print(f"--- graph after pass {p.name} ---\n{ctx.graph_module.graph}", file=sys.stderr)
        return ctx
