"""Analyze stage, execution part: the captured graph run one layer at a time, weights read as needed.

Design decisions (llm-compressor's sequential pipeline, on the captured graph):
- The graph is split (``torch.fx.passes.split_module``) by the module that owns each node: a
  prefix (embeddings, rotary tables, masks), one segment per decoder layer (everything under
  the attention site's parent module, ``model.layers.3``), and a suffix (final norm, LM head).
  A node outside every layer joins the prefix when nothing it reads was computed in a layer,
  else the suffix. A graph that does not split this way (a suffix value read by a layer) is
  refused with ``LayerwiseError``.
- A segment's weights are read from the checkpoint (``read``, lazy) when it runs and dropped
  after; every calibration batch runs through the segment before the next one is read
  (layer-major), so each weight is read once per sweep and memory follows the largest segment.
- Between segments only the values later segments read are kept: per batch the hidden state
  entering each layer (``Sweep.boundaries``, kept for the backward sweep and the exact
  re-measurements) and what the prefix shares with every layer (rotary tables, masks).
- Compute dtype: float32 on the CPU, the checkpoint's floating dtype elsewhere (bf16/fp16 on
  GPUs); integer and bool tensors keep theirs.
- Every segment's outputs are checked for NaN and infinity as they are computed (one ``isfinite`` per
  hidden state): a ``NonFiniteError`` names the first layer that made one and its likely cause (a bad RoPE
  config before layer 0, that layer's weights or an overflow after), instead of scores and plans of NaN.
- On the CPU, memory freed after each segment is handed back to the system (``release``: glibc's
  ``malloc_trim``), so a segment's freed weights are not counted again by the next one's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from hydracc.analysis.head import Head, HeadSplit, split_head
from hydracc.errors import HydraError
from hydracc.frontend.capture import SITE_META, CapturedModel

Hook = Callable[[int, Any, tuple, dict], torch.Tensor]
"""``hook(layer, sdpa_target, args, kwargs) -> output`` called at each attention site."""


def _libc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return lambda: None
    return lambda: None if trim(0) else None


_trim = _libc_trim()


def release(device: torch.device) -> None:
    """Hand memory freed on the CPU back to the system (a no-op elsewhere and without glibc)."""
    if device.type == "cpu":
        _trim()


class LayerwiseError(HydraError):
    """The captured graph cannot be run one layer at a time."""


class NonFiniteError(HydraError):
    """A value computed while analyzing or distilling is NaN or infinite; ``layer`` says where (None: before
    the first layer or after the last)."""

    def __init__(self, message: str, *, hint: str | None = None, layer: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.message = message
        self.layer = layer

    def __str__(self) -> str:  # not ``args``: torch.fx's interpreter appends the graph node to them
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


ORIGINAL = "the original model"
"""``forward_sweep``'s default ``model``: the checkpoint's own graph, whose non-finite values mean a bad
config or bad weights."""


def nonfinite_kind(t: torch.Tensor) -> str:
    """``"NaN"`` or ``"infinite"``: what a tensor holding a non-finite value holds."""
    return "NaN" if bool(torch.isnan(t).any()) else "infinite"


def check_segment_outputs(seg: Segment, outs: Sequence[Any], batch: int, model: str = ORIGINAL,
                          hint: str | None = None, dtype: torch.dtype | None = None) -> None:
    """Raise ``NonFiniteError`` when a floating output of ``seg`` holds NaN or infinity (the prefix's
    masks may hold -inf); ``model`` names what ran, ``hint`` replaces the default likely causes."""
    for out in outs:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            continue
        bad = (torch.isnan(out) | (out == float("inf"))) if seg.index == 0 else ~torch.isfinite(out)
        if not bool(bad.any()):
            continue
        what = nonfinite_kind(out[bad])
        if seg.layer is None and seg.index == 0:
            raise NonFiniteError(
                f"{model}'s embeddings and rotary tables (before layer 0) are {what} on calibration batch {batch + 1}",
                hint=hint or "check rope_theta and rope_scaling / rope_parameters in config.json, or the embedding "
                "weights in the checkpoint",
            )
        where = f"layer {seg.layer}" if seg.layer is not None else "the last layer (final norm, LM head)"
        raise NonFiniteError(
            f"{model}'s outputs are {what} at {where} (its input was finite), calibration batch {batch + 1}",
            hint=hint or f"check {where}'s weights in the checkpoint (NaN or infinity, or values so large they overflow "
            f"{str(dtype or out.dtype).removeprefix('torch.')}), and rope / rms_norm_eps (layer_norm_epsilon) in "
            "config.json",
            layer=seg.layer,
        )


@dataclass
class Segment:
    """One piece of the split graph: ``args`` says where each positional input comes from."""

    name: str
    index: int
    layer: int | None
    module: fx.GraphModule
    args: list[tuple[str, str]]
    """Per input: ``("weight", model name)``, ``("buffer", name)``, ``("input", "input_ids")``,
    ``("none", "")`` or ``("value", key)`` (an output of an earlier segment)."""
    outputs: list[str]
    """Keys of the values this segment produces, in the order it returns them."""

    @property
    def value_keys(self) -> list[str]:
        return [key for kind, key in self.args if kind == "value"]

    @property
    def weight_names(self) -> list[str]:
        return [key for kind, key in self.args if kind == "weight"]


@dataclass
class LayerwiseGraph:
    segments: list[Segment]
    last_use: dict[str, int]
    """Key -> index of the last segment that reads it."""
    logits_key: str
    head: HeadSplit | None = None
    """The suffix split at its LM head (``head.split_head``), when it ends in one."""

    @property
    def prefix(self) -> Segment:
        return self.segments[0]

    @property
    def suffix(self) -> Segment:
        return self.segments[-1]

    @property
    def layers(self) -> list[Segment]:
        return self.segments[1:-1]

    def layer(self, layer: int) -> Segment:
        for seg in self.layers:
            if seg.layer == layer:
                return seg
        raise KeyError(layer)


def split_by_layer(captured: CapturedModel, gm: fx.GraphModule) -> LayerwiseGraph:
    """Split ``gm`` (``captured``'s graph, possibly retargeted to a device) into segments."""
    prefixes = {s.layer: s.module.rsplit(".", 1)[0] for s in captured.sites}
    order = {layer: i + 1 for i, layer in enumerate(sorted(prefixes))}
    last = len(order) + 1
    part: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        stack = n.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        owner = next((order[layer] for layer, pre in prefixes.items() if path == pre or path.startswith(pre + ".")), None)
        inputs = [part[a] for a in n.all_input_nodes if a in part]
        if owner is None:
            owner = 0 if not inputs or max(inputs) == 0 else last
        elif inputs and max(inputs) > owner:
            raise LayerwiseError(f"node {n.name} of {path} reads a value computed after its layer")
        part[n] = owner
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    specs = {spec.arg.name: spec for spec in captured.exported.graph_signature.input_specs}
    producer: dict[fx.Node, str] = {}
    segments: list[Segment] = []
    for node in split.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in producer:
            producer[node] = f"{producer[node.args[0]]}.{node.args[1]}"
        if node.op != "call_module":
            continue
        index = int(str(node.target).removeprefix("submod_"))
        args: list[tuple[str, str]] = []
        for a in node.args:
            if not isinstance(a, fx.Node):
                raise LayerwiseError(f"segment {node.target} takes a constant argument {a!r}")
            if a.op == "placeholder":
                spec = specs[a.name]
                kind = spec.kind.name
                if kind == "PARAMETER":
                    args.append(("weight", str(spec.target)))
                elif kind in ("BUFFER", "CONSTANT_TENSOR", "CUSTOM_OBJ"):
                    args.append(("buffer", str(spec.target)))
                elif kind == "USER_INPUT" and a.name == "input_ids":
                    args.append(("input", "input_ids"))
                else:
                    args.append(("none", ""))
            elif a in producer:
                args.append(("value", producer[a]))
            else:
                raise LayerwiseError(f"segment {node.target} reads {a.name}, which no earlier segment produced")
        module = getattr(split, str(node.target))
        out_node = next(n for n in module.graph.nodes if n.op == "output")
        produced = out_node.args[0]
        key = str(node.target)
        producer[node] = key
        outputs = [f"{key}.{i}" for i in range(len(produced))] if isinstance(produced, (tuple, list)) else [key]
        layer = next((layer for layer, i in order.items() if i == index), None)
        name = "prefix" if index == 0 else "suffix" if index == last else f"layer {layer}"
        segments.append(Segment(name, index, layer, module, args, outputs))
    if [s.index for s in segments] != list(range(last + 1)):
        raise LayerwiseError(f"the graph split into segments {[s.index for s in segments]}, expected 0..{last}")
    out = next(n for n in split.graph.nodes if n.op == "output").args[0]
    first = out[0] if isinstance(out, (tuple, list)) else out
    if first not in producer or not producer[first].startswith(f"submod_{last}"):
        raise LayerwiseError("the graph's first output (the logits) does not come from the last segment")
    last_use: dict[str, int] = {}
    for seg in segments:
        for key in seg.value_keys:
            last_use[key] = max(last_use.get(key, 0), seg.index)
    for seg in segments[1:-1]:
        site_layers = {n.meta.get(SITE_META) for n in seg.module.graph.nodes if n.meta.get(SITE_META) is not None}
        if site_layers != {seg.layer}:
            raise LayerwiseError(f"segment {seg.name} holds attention sites {sorted(site_layers)}, expected [{seg.layer}]")
    suffix = segments[-1]
    head = split_head(suffix.module) if suffix.outputs.index(producer[first]) == 0 else None
    if head is not None and suffix.args[head.weight_arg][0] != "weight":
        head = None
    return LayerwiseGraph(segments, last_use, producer[first], head)


class SegmentInterpreter(fx.Interpreter):
    """Runs one segment, sending its attention site (if any) through ``hook``."""

    def __init__(self, gm: fx.GraphModule, hook: Hook | None) -> None:
        super().__init__(gm)
        self.hook = hook

    def run_node(self, n: fx.Node) -> Any:
        if self.hook is not None and n.op == "call_function" and n.meta.get(SITE_META) is not None:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return self.hook(n.meta[SITE_META], n.target, args, kwargs)
        return super().run_node(n)


def compute_dtype(device: torch.device, weights: Sequence[torch.dtype]) -> torch.dtype:
    """float32 on the CPU; elsewhere the checkpoint's (widest) floating dtype."""
    if device.type == "cpu":
        return torch.float32
    floats = [d for d in weights if d.is_floating_point]
    return max(floats, key=lambda d: torch.empty((), dtype=d).element_size()) if floats else torch.float32


@dataclass
class Runner:
    """Runs segments of a ``LayerwiseGraph`` on ``device`` with weights from ``read``."""

    graph: LayerwiseGraph
    captured: CapturedModel
    read: Callable[[str], torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    weight_reads: int = 0
    peak_segment_bytes: int = 0
    _buffers: dict[str, Any] = field(default_factory=dict)

    def cast(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def load(self, seg: Segment, skip: set[int] | None = None) -> dict[int, Any]:
        """The segment's weights and buffers, by argument position (read now; drop the dict to free them)."""
        out: dict[int, Any] = {}
        nbytes = 0
        for i, (kind, key) in enumerate(seg.args):
            if skip and i in skip:
                out[i] = None
            elif kind == "weight":
                out[i] = self.cast(self.read(key))
                nbytes += out[i].numel() * out[i].element_size()
                self.weight_reads += 1
            elif kind == "buffer":
                if key not in self._buffers:
                    ep = self.captured.exported
                    value = ep.state_dict.get(key, ep.constants.get(key))
                    if isinstance(value, torch.Tensor) and value.device.type == "meta":
                        value = self.read(key)
                    self._buffers[key] = self.cast(value)
                out[i] = self._buffers[key]
        self.peak_segment_bytes = max(self.peak_segment_bytes, nbytes)
        return out

    def call(self, seg: Segment, weights: dict[int, Any], env: dict[str, Any], ids: torch.Tensor | None = None,
             hook: Hook | None = None) -> list[Any]:
        """Run ``seg`` on ``env``'s values (and ``ids`` for the prefix); return its outputs, in order."""
        args = []
        for i, (kind, key) in enumerate(seg.args):
            if kind == "value":
                args.append(env[key])
            elif kind == "input":
                args.append(ids)
            elif kind == "none":
                args.append(None)
            else:
                args.append(weights[i])
        out = SegmentInterpreter(seg.module, hook).run(*args) if hook is not None else seg.module(*args)
        return list(out) if len(seg.outputs) > 1 or isinstance(out, (tuple, list)) else [out]


@dataclass
class Sweep:
    """What a forward sweep keeps: per batch, the values each later segment reads."""

    envs: list[dict[str, Any]]
    """Per batch: prefix values (shared by every layer) and the latest hidden state."""
    boundaries: dict[int, list[dict[str, Any]]]
    """Segment index -> per batch, the values that segment read (hidden states, shared values)."""


def forward_sweep(runner: Runner, batches: Sequence[torch.Tensor], hook: Hook | None = None,
                  keep: bool = True, on_segment: Callable[[Segment], None] | None = None,
                  until: int | None = None, model: str = ORIGINAL, hint: str | None = None) -> Sweep:
    """Run every batch through the prefix and every layer, layer-major; the suffix is left to the caller.

    ``keep``: record each layer's and the suffix's inputs (``Sweep.boundaries``) for later
    backward sweeps and re-measurements. ``on_segment(seg)`` runs once every batch has passed
    ``seg``; ``until``: stop after the segment with this index. A NaN or infinite output is a
    ``NonFiniteError`` naming the layer (``model``: what ran, ``hint``: its likely causes; see
    ``check_segment_outputs``).
    """
    g = runner.graph
    envs: list[dict[str, Any]] = [{} for _ in batches]
    boundaries: dict[int, list[dict[str, Any]]] = {}
    with torch.no_grad():
        for seg in g.segments[:-1]:
            weights = runner.load(seg)
            if keep and seg.index > 0:
                boundaries[seg.index] = [{k: env[k] for k in seg.value_keys} for env in envs]
            for bi, (env, ids) in enumerate(zip(envs, batches)):
                outs = runner.call(seg, weights, env, ids.to(runner.device) if seg.index == 0 else None, hook)
                check_segment_outputs(seg, outs, bi, model, hint, runner.dtype)
                env.update(zip(seg.outputs, outs))
                for key in [k for k in env if g.last_use.get(k, -1) <= seg.index]:
                    del env[key]  # read by no later segment
            del weights
            release(runner.device)
            if on_segment is not None:
                on_segment(seg)
            if until is not None and seg.index >= until:
                return Sweep(envs, boundaries)
        if keep:
            boundaries[g.suffix.index] = [{k: env[k] for k in g.suffix.value_keys} for env in envs]
    return Sweep(envs, boundaries)


def suffix_logits(runner: Runner, weights: dict[int, Any], env: dict[str, Any]) -> torch.Tensor:
    """The logits of one batch from the suffix's inputs (``env``), as the graph computes them."""
    outs = runner.call(runner.graph.suffix, weights, env)
    return outs[runner.graph.suffix.outputs.index(runner.graph.logits_key)] if len(outs) > 1 else outs[0]


def load_head(runner: Runner) -> tuple[dict[int, Any], Head]:
    """The suffix's weights but the LM head's, and the head with its weight in the checkpoint's dtype
    (cast a chunk at a time); a suffix without a separable head loads whole (``Head`` without weight)."""
    g, seg = runner.graph, runner.graph.suffix
    vocab = int(getattr(runner.captured.config, "vocab_size", 0) or 0)
    if g.head is None:
        return runner.load(seg), Head(None, None, torch.float32, vocab)
    skip = {g.head.weight_arg} | ({g.head.bias_arg} if g.head.bias_arg is not None else set())
    weights = runner.load(seg, skip)
    w = runner.read(seg.args[g.head.weight_arg][1]).to(runner.device)
    b = runner.read(seg.args[g.head.bias_arg][1]).to(runner.device) if g.head.bias_arg is not None else None
    runner.weight_reads += 1
    runner.peak_segment_bytes = max(runner.peak_segment_bytes, w.numel() * w.element_size())
    return weights, Head(w, b, runner.dtype)


def suffix_hidden(runner: Runner, weights: dict[int, Any], env: dict[str, Any]) -> torch.Tensor:
    """The LM head's input for one batch, ``[rows, T, H]`` (without a separable head: the logits)."""
    g = runner.graph
    if g.head is None:
        return suffix_logits(runner, weights, env)
    args = []
    for i, (kind, key) in enumerate(g.suffix.args):
        args.append(env[key] if kind == "value" else None if kind in ("none", "input") else weights[i])
    return g.head.prehead(*args)
