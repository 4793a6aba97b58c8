"""The hybrid cache: keys and values for full heads only, a fixed-size state for linear heads.

Design decisions:
- ``HybridCache`` is a transformers ``Cache`` made of ``HybridLayer``s, so ``generate`` (and
  anything else that drives transformers' cache API) uses it unchanged. A layer does not know
  its head kinds until the attention function tells it: ``update`` only wraps the new keys
  and values in a ``HybridStep`` (transformers passes what ``update`` returns straight to the
  attention function), and ``HybridStep.attend`` configures the layer on first use, appends
  the new keys and values of the KV heads some full head still needs, and advances the
  linear heads' state. Nothing else is kept: a KV head whose query heads are all linear costs
  no cache at all.
- Linear heads keep a fixed fp32 state per query head, grouped by kind
  (the kind's ``step`` and ``state_shapes`` hooks, run by ``naive.linear_group_step`` as in the
  decode op's reference): ``S = sum phi(k) v^T`` and ``z = sum phi(k)`` for elu and hedgehog,
  the delta-rule matrix ``S`` for gdn; decoding with the cache equals recomputing the
  whole sequence (tests check it). With learned parameters, linear outputs get the layer's
  scale-normalized fusion, as in the op.
- Streaming heads keep their own small cache of the KV heads they read, a fixed ring of
  ``sink + window - 1`` rows (the largest sink and window over the layer's streaming heads)
  with the absolute position of each row: position ``p`` lives in row ``p`` while ``p < sink``,
  else in row ``sink + (p - sink) % (window - 1)``; rows not yet written hold
  ``EMPTY_POSITION``, which no query sees. A step attends over the ring followed by its new
  rows (so the queries' positions are the last ones, as the decode op reads them), then writes
  the new rows into their slots by index arithmetic: no device sync, constant shapes, and the
  same code runs in the exported ONNX graphs (the first position can be a traced tensor).
- ``get_seq_length`` counts tokens seen, not cached rows, so positions and masks are right
  even for a layer that caches nothing.
- ``HybridCache(config, max_cache_len=N)`` (what ``generate`` builds: it knows the final length)
  preallocates the full heads' keys and values for ``N`` tokens and writes each step's rows in
  place; ``keys``/``values`` are views of the filled rows. Without it, or past ``N`` (the
  buffer then doubles), rows are appended by concatenation, as transformers' ``DynamicCache``
  does: a copy of the whole cache per step. Anything that replaces the tensors (reordering,
  ``set_cache_tensors``) drops the buffer; the next step makes a new one.
- A one-token step on a device in ``DECODE_OP_DEVICES`` (CUDA) goes through the fused
  ``hydracc::hybrid_decode`` op: one launch for the whole layer over these same tensors
  (states updated in place). The first chunk of a layer with an elu or hedgehog head, on CUDA
  in bf16/fp16, runs the fused Triton prefill, which writes the starting states in the same
  layout. Elsewhere, and for later chunks, the torch path below runs.
- Left-padded batches (``pads``: pad tokens per row, read from the mask of the first chunk):
  full heads mask the pad keys; the first chunk's linear heads run once per row over its real
  tokens, so each row's state is the state of that row alone, and later tokens need no mask
  (they are real in every row). These steps take the torch path, not the fused kernels.
  Streaming heads keep one ring of positions for the whole batch, so padded batches with
  streaming heads are refused in generation (the forward pass without a cache takes them).
- Cropping (assisted decoding) cannot undo a linear state and is refused; batch reordering
  (beam search) and repetition apply to every tensor of the layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from hydracc.errors import HydraError, PaddingNotSupportedError
from hydracc.kernels.kinds import STATE_PARTS, STREAMING, kind_by_code, state_shapes
from hydracc.kernels.layout import DecodeLayout, decode_layout, take_heads
from hydracc.kernels.naive import recurrent_heads


class HybridLayer(DynamicLayer):
    """One attention layer's share of a ``HybridCache``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.seen = 0
        self.kinds: list[int] | None = None
        self.full_heads: list[int] = []
        self.linear_heads: list[int] = []
        self.linear_groups: dict[int, list[int]] = {}
        self.stream_heads: list[int] = []
        self.stream_kv: list[int] = []
        self.cached_kv: list[int] = []
        self.grouped_full = False
        self.layout: DecodeLayout | None = None
        """The layer's heads as the decode op lays them out (``layout.decode_layout``)."""
        self.states: dict[int, tuple[Tensor, ...] | None] = {}
        self.window_keys: Tensor | None = None
        self.window_values: Tensor | None = None
        self.window_pos: Tensor | None = None
        self.sink = self.window = 0
        self.first_position: Tensor | None = None
        """Absolute position of the next step's first token, as a tensor (the ONNX export sets it from
        its ``position_ids`` input); None: the tokens seen so far (``seen``)."""
        self._indices: dict[tuple[str, torch.device], Tensor] = {}
        self.pads: Tensor | None = None
        """Left-pad tokens per row ``[B]`` of a padded batch (set by its first chunk), None: no padding."""
        self.capacity: int | None = kwargs.get("capacity")
        """Rows to preallocate for the full heads' keys and values (None: append by concatenation)."""
        self._buffers: tuple[Tensor, Tensor] | None = None

    def index(self, name: str, heads: list[int], device: torch.device) -> Tensor:
        """``heads`` as an index tensor on ``device``, made once per layer (no copy per step)."""
        key = (name, device)
        if key not in self._indices:
            self._indices[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._indices[key]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[HybridStep, HybridStep]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = HybridStep(self, key_states, value_states, self.seen)
        self.seen += key_states.shape[-2]
        return step, step

    def configure(self, kinds: list[int], num_heads: int, num_kv_heads: int, head_windows: list[int] | None = None) -> None:
        if self.kinds is not None:
            if list(kinds) != self.kinds:
                raise HydraError("a HybridCache layer was used with two different head-kind layouts; use one cache per model")
            return
        group = num_heads // num_kv_heads
        self.kinds = list(kinds)
        self.layout = decode_layout(tuple(int(c) for c in kinds), num_heads, num_kv_heads)
        self.full_heads = [h for h, c in enumerate(kinds) if kind_by_code(c).keeps_kv]
        self.linear_heads = [h for h, c in enumerate(kinds) if kind_by_code(c).linear]
        self.linear_groups = {}
        for h in self.linear_heads:
            self.linear_groups.setdefault(kinds[h], []).append(h)
        self.states = {code: None for code in self.linear_groups}
        self.stream_heads = [h for h, c in enumerate(kinds) if c == STREAMING.code]
        if len(self.full_heads) + len(self.linear_heads) + len(self.stream_heads) != len(kinds):  # pragma: no cover
            raise HydraError("the hybrid cache handles full, linear and streaming heads only; this layer has another kind")
        if self.stream_heads:
            if not head_windows or len(head_windows) != 2 * len(kinds):
                raise HydraError("streaming heads need the layer's head_windows (sink and window per head)")
            self.stream_kv = sorted({h // group for h in self.stream_heads})
            self.sink = max(head_windows[2 * h] for h in self.stream_heads)
            self.window = max(head_windows[2 * h + 1] for h in self.stream_heads)
        self.cached_kv = sorted({h // group for h in self.full_heads})
        # SDPA can read the cached heads unexpanded (enable_gqa) when the i-th block of full heads
        # uses the i-th cached KV head and all blocks have the same size
        per = len(self.full_heads) // max(1, len(self.cached_kv))
        self.grouped_full = (
            bool(self.full_heads)
            and per * len(self.cached_kv) == len(self.full_heads)
            and all(h // group == self.cached_kv[i // per] for i, h in enumerate(self.full_heads))
        )

    # --- cache tensors by name (ONNX export feeds and reads them) -----------------------

    def cache_names(self) -> list[str]:
        """Names of the tensors this layer holds once configured, in a fixed order."""
        names = ["keys", "values"] if self.cached_kv else []
        for code in sorted(self.linear_groups):
            names += [f"{kind_by_code(code).name}.{part}" for part in STATE_PARTS[code]]
        if self.stream_heads:
            names += ["window.keys", "window.values", "window.positions"]
        return names

    def cache_tensors(self) -> list[Tensor]:
        out: list[Tensor] = []
        if self.cached_kv:
            out += [self.keys, self.values]
        for code in sorted(self.linear_groups):
            state = self.states[code]
            if state is None:
                raise HydraError("the linear state is empty: run the layer before reading its cache")
            out += list(state)
        if self.stream_heads:
            out += [self.window_keys, self.window_values, self.window_pos]
        return out

    def set_cache_tensors(self, tensors: list[Tensor]) -> None:
        it = iter(tensors)
        if self.cached_kv:
            self.keys, self.values = next(it), next(it)
        for code in sorted(self.linear_groups):
            self.states[code] = tuple(next(it) for _ in STATE_PARTS[code])
        if self.stream_heads:
            self.window_keys, self.window_values, self.window_pos = next(it), next(it), next(it)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def append_kv(self, new_k: Tensor, new_v: Tensor) -> None:
        """Add rows to the full heads' keys and values: in place into the preallocated buffer
        (``capacity``), else by concatenation."""
        if self.keys is None or self.keys.dim() == 0 or self.keys.numel() == 0:
            n = 0
        else:
            n = self.keys.shape[2]
        if self.capacity is None or torch.compiler.is_exporting():
            if n == 0:
                self.keys, self.values = new_k.contiguous(), new_v.contiguous()
            else:
                self.keys = torch.cat([self.keys, new_k], dim=-2)
                self.values = torch.cat([self.values, new_v], dim=-2)
            return
        t = new_k.shape[2]
        buf = self._buffers
        if (
            buf is None
            or n + t > buf[0].shape[2]
            or buf[0].shape[:2] != new_k.shape[:2]
            or buf[0].dtype != new_k.dtype
            or buf[0].device != new_k.device
            or (n and self.keys.data_ptr() != buf[0].data_ptr())  # the rows were replaced (reorder, set_cache_tensors)
        ):
            rows = max(self.capacity, n + t) if buf is None or n + t <= self.capacity else 2 * (n + t)
            b, h, _, d = new_k.shape
            buf = (new_k.new_empty(b, h, rows, d), new_v.new_empty(b, h, rows, new_v.shape[-1]))
            if n:
                buf[0].narrow(2, 0, n).copy_(self.keys)
                buf[1].narrow(2, 0, n).copy_(self.values)
            self._buffers = buf
        buf[0].narrow(2, n, t).copy_(new_k)
        buf[1].narrow(2, n, t).copy_(new_v)
        self.keys, self.values = buf[0].narrow(2, 0, n + t), buf[1].narrow(2, 0, n + t)

    def _kv_tensors(self) -> list[Tensor]:
        """The full heads' keys and values as held: the whole preallocated buffer when in use."""
        if self._buffers is not None and isinstance(self.keys, Tensor) and self.keys.data_ptr() == self._buffers[0].data_ptr():
            return list(self._buffers)
        return [t for t in (self.keys, self.values) if isinstance(t, Tensor)]

    def kv_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kv_tensors())

    def _tensors(self) -> list[Tensor]:
        out = self._kv_tensors() + [t for t in (self.window_keys, self.window_values) if isinstance(t, Tensor)]
        for state in self.states.values():
            out += list(state or ())
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _each(self, fn: Any) -> None:
        for name in ("keys", "values", "window_keys", "window_values"):
            t = getattr(self, name)
            if isinstance(t, Tensor) and t.dim() > 0:
                setattr(self, name, fn(t))
        for code, state in self.states.items():
            if state is not None:
                self.states[code] = tuple(fn(t) for t in state)
        if self.pads is not None:
            self.pads = fn(self.pads)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._each(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._each(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise HydraError("the hybrid cache cannot be cropped: a linear head's state cannot forget tokens (assisted decoding is not supported)")

    def reset(self) -> None:
        # (a preallocated buffer stays for the next sequence of the same shape)
        self.keys = self.values = self.window_keys = self.window_values = self.window_pos = None
        self.states = {code: None for code in self.linear_groups}
        self.seen = 0
        self.pads = None
        self.is_initialized = False


DECODE_OP_DEVICES: set[str] = {"cuda"}
"""Device types whose one-token steps use the fused ``hydracc::hybrid_decode`` op (tests add "cpu"
to run the op's plain-torch implementation through the same wiring)."""

FUSED_PREFILL_DEVICES: set[str] = {"cuda"}
FUSED_PREFILL_DTYPES: set[torch.dtype] = {torch.bfloat16, torch.float16}
"""The first chunk (an empty cache) of a layer with an elu or hedgehog head runs the fused Triton
prefill (``triton_prefill.hybrid_prefill`` with ``states=``, so it also hands decode its
starting state) on these devices and dtypes, as the op does outside generation; tests add "cpu"
and fp32 to run the kernel under the Triton interpreter through the same wiring."""


class HybridStep:
    """What ``HybridLayer.update`` hands the attention function: the new keys/values and the layer."""

    def __init__(self, layer: HybridLayer, keys: Tensor, values: Tensor, past: int) -> None:
        self.layer = layer
        self.new_keys = keys
        self.new_values = values
        self.past = past

    @property
    def shape(self) -> torch.Size:
        """Shape of the keys the attention sees (past + new tokens), as a tensor would report it."""
        b, h, t, d = self.new_keys.shape
        return torch.Size((b, h, self.past + t, d))

    def attend(
        self,
        query: Tensor,
        kinds: list[int],
        scale: float,
        head_params: Sequence[Tensor] = (),
        head_windows: Sequence[int] = (),
        pads: Tensor | None = None,
    ) -> Tensor:
        """Hybrid attention of ``query`` ``[B, Hq, T, D]`` over everything seen; returns ``[B, Hq, T, Dv]``.

        ``pads``: left-pad tokens per row (``loader.left_padding`` of the step's mask), None: none."""
        layer = self.layer
        b, hq, tq, _ = query.shape
        hkv = self.new_keys.shape[1]
        layer.configure(kinds, hq, hkv, list(head_windows))
        self._set_pads(pads)
        padded = layer.pads is not None
        if tq == 1 and query.device.type in DECODE_OP_DEVICES and len(layer.full_heads) < hq and not padded:
            # (an all-full layer keeps SDPA, as in prefill: bit-identical to the original model)
            return self._attend_one_token(query, kinds, scale, head_params, head_windows)
        if self.past == 0 and tq > 1 and not padded and self._fused_prefill_applies(query, kinds):
            return self._attend_first_chunk(query, kinds, scale, head_params, head_windows)
        group = hq // hkv
        make = query.new_zeros if padded else query.new_empty  # (pad queries' linear heads are never written)
        out = make(b, hq, tq, self.new_values.shape[-1])
        self._append_full_kv()
        if layer.full_heads:
            heads = layer.index("full", layer.full_heads, query.device)
            qf = take_heads(query, tuple(layer.full_heads), lambda: heads)
            if layer.grouped_full:  # every cached KV head serves the same number of full heads, in order
                k, v, gqa = layer.keys, layer.values, len(layer.cached_kv) < len(layer.full_heads)
            else:  # uneven: expand the cached heads to one per full head
                pos = {kv: i for i, kv in enumerate(layer.cached_kv)}
                kv_of = layer.index("full_kv", [pos[h // group] for h in layer.full_heads], query.device)
                k, v, gqa = layer.keys.index_select(1, kv_of), layer.values.index_select(1, kv_of), False
            tk = k.shape[2]
            extra = {"enable_gqa": True} if gqa else {}
            if padded:  # causal over each row's real keys; a pad query sees every key (finite, never read)
                assert layer.pads is not None
                mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(diagonal=tk - tq)
                mask = mask & (torch.arange(tk, device=query.device) >= layer.pads[:, None])[:, None, :]
                mask = (mask | ~mask.any(dim=-1, keepdim=True))[:, None]
                full = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale, **extra)
            elif tq == tk:  # prefill from empty: plain causal
                full = F.scaled_dot_product_attention(qf, k, v, is_causal=True, scale=scale, **extra)
            elif tq == 1 and gqa and len(layer.full_heads) < hq and b * k.shape[1] >= torch.get_num_threads():
                # one decode step sees every key; each cached KV head's query heads become the query rows of
                # one head, so K/V are read once per KV head (2x faster than enable_gqa on one CPU thread),
                # when batch x KV heads still give every thread work (else heads in parallel are faster)
                nkv = k.shape[1]
                rows = qf.reshape(b, nkv, len(layer.full_heads) // nkv, qf.shape[-1])
                full = F.scaled_dot_product_attention(rows, k, v, scale=scale).reshape(b, -1, 1, v.shape[-1])
            elif tq == 1:  # (an all-full layer: the original model's call)
                full = F.scaled_dot_product_attention(qf, k, v, scale=scale, **extra)
            else:  # a chunk after earlier tokens: causal, aligned bottom-right
                mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(diagonal=tk - tq)
                full = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale, **extra)
            out.index_copy_(1, heads, full if full.dtype == out.dtype else full.to(out.dtype))
        # linear and streaming heads: the same function as the decode op's reference
        window: list[tuple[Tensor, Tensor, Tensor]] = []

        def new_window() -> tuple[Tensor, Tensor, Tensor]:  # the kept rows plus the new ones
            window.append(self._window_with_new_rows())
            return window[0]

        assert layer.layout is not None
        if padded and self.past == 0:  # the chunk holding the pads: each row's heads over its own tokens
            self._linear_rows(out, query, scale, head_params, head_windows)
            return out
        layer.states.update(recurrent_heads(
            out, query, self.new_keys, self.new_values, layer.layout, scale, head_params, head_windows,
            layer.states, new_window, lambda name, heads: layer.index(name, list(heads), query.device),
        ))
        if window:  # then keep only the sink and window rows
            self._keep_window(*window[0])
        return out

    def _set_pads(self, pads: Tensor | None) -> None:
        """Keep the first chunk's padding; later steps must show the same."""
        layer = self.layer
        if self.past == 0:
            if pads is not None and layer.stream_heads:
                raise PaddingNotSupportedError(
                    "padded batches cannot be generated with streaming heads (their window is kept for the batch "
                    "as a whole)", hint="generate these prompts one at a time, or pass an unpadded batch")
            layer.pads = pads
        elif pads is not None and (layer.pads is None or not torch.equal(pads, layer.pads)):
            # (no mask at a later step: the cache still masks the first chunk's pads)
            raise PaddingNotSupportedError("the padding changed after the first chunk; only the prompt may be padded",
                                           hint="pad prompts on the left, then feed one more token per row")

    def _linear_rows(
        self, out: Tensor, query: Tensor, scale: float, head_params: Sequence[Tensor], head_windows: Sequence[int]
    ) -> None:
        """Linear heads of a padded first chunk, one row at a time over its real tokens; stack the states."""
        layer = self.layer
        assert layer.pads is not None and layer.layout is not None
        tq, dv = query.shape[2], self.new_values.shape[-1]
        parts: dict[int, list[tuple[Tensor, ...]]] = {code: [] for code in layer.linear_groups}
        for row, pad in enumerate(layer.pads.tolist()):
            sl = slice(row, row + 1)
            if pad >= tq:  # nothing but padding: empty state
                for code in parts:
                    parts[code].append(self._new_state(query[sl], code, dv, torch.zeros))
                continue
            piece = out[sl, :, pad:].clone()
            states = recurrent_heads(
                piece, query[sl, :, pad:], self.new_keys[sl, :, pad:], self.new_values[sl, :, pad:], layer.layout,
                scale, head_params, head_windows, {code: None for code in parts}, None,
                lambda name, heads: layer.index(name, list(heads), query.device),
            )
            out[sl, :, pad:] = piece
            for code, state in states.items():
                parts[code].append(state)
        layer.states.update({code: tuple(torch.cat(ts) for ts in zip(*rows, strict=True)) for code, rows in parts.items()})

    def _attend_one_token(
        self, query: Tensor, kinds: list[int], scale: float, head_params: Sequence[Tensor], head_windows: Sequence[int]
    ) -> Tensor:
        """One new token through ``hydracc::hybrid_decode`` (the caches laid out as the op reads them)."""
        from hydracc.kernels.decode_op import hybrid_decode

        layer = self.layer
        dv = self.new_values.shape[-1]
        self._append_full_kv()
        wk = wv = wpos = None
        if layer.stream_heads:
            wk, wv, wpos = self._window_with_new_rows()
        states: list[Tensor] = []
        for code in sorted(layer.linear_groups):
            if layer.states[code] is None:  # the first token of the sequence
                layer.states[code] = self._new_state(query, code, dv, torch.zeros)
            states += list(layer.states[code])  # updated in place by the op
        out = hybrid_decode(
            query, self.new_keys, self.new_values, layer.keys if layer.cached_kv else None,
            layer.values if layer.cached_kv else None, states, wk, wv, wpos, kinds, scale, head_params, head_windows,
        )
        if layer.stream_heads:
            assert wk is not None and wv is not None and wpos is not None
            self._keep_window(wk, wv, wpos)
        return out

    def _new_state(self, query: Tensor, code: int, dv: int, make: Any) -> tuple[Tensor, ...]:
        """Fresh fp32 state tensors of linear kind ``code`` in the decode op's layout (``make``:
        ``torch.zeros`` or ``torch.empty``), shaped by the kind's ``state_shapes``."""
        shapes = state_shapes(code, query.shape[0], len(self.layer.linear_groups[code]), query.shape[-1], dv)
        return tuple(make(shape, dtype=torch.float32, device=query.device) for shape in shapes)

    def _fused_prefill_applies(self, query: Tensor, kinds: list[int]) -> bool:
        """Whether this first chunk takes the fused Triton prefill (see ``FUSED_PREFILL_DEVICES``)."""
        from hydracc.kernels.hybrid_op import triton_prefill_takes

        q, k, v = query, self.new_keys, self.new_values
        if not triton_prefill_takes(q, k, v, kinds, FUSED_PREFILL_DEVICES, FUSED_PREFILL_DTYPES):
            return False
        from hydracc.kernels.triton_prefill import prefill_fits

        return prefill_fits(q, k, v)

    def _attend_first_chunk(
        self, query: Tensor, kinds: list[int], scale: float, head_params: Sequence[Tensor], head_windows: Sequence[int]
    ) -> Tensor:
        """The first chunk through the fused prefill, which also writes the linear heads' states."""
        from hydracc.kernels.triton_prefill import hybrid_prefill

        layer = self.layer
        dv = self.new_values.shape[-1]
        states: list[Tensor] = []
        for code in sorted(layer.linear_groups):  # decode_layout's order: by kind code
            layer.states[code] = self._new_state(query, code, dv, torch.empty)
            states += list(layer.states[code])  # written by the kernel
        out = hybrid_prefill(
            query, self.new_keys, self.new_values, kinds, scale, head_params, head_windows, states=states
        )
        self._append_full_kv()
        if layer.stream_heads:
            self._keep_window(*self._window_with_new_rows())
        return out

    def _append_full_kv(self) -> None:
        """Add the new keys/values of the KV heads some full head reads to the layer's cache."""
        layer = self.layer
        if not layer.cached_kv:
            return
        kv = tuple(layer.cached_kv)

        def idx() -> Tensor:
            return layer.index("cached_kv", layer.cached_kv, self.new_keys.device)

        layer.append_kv(take_heads(self.new_keys, kv, idx), take_heads(self.new_values, kv, idx))

    def _window_with_new_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """The streaming heads' ring rows followed by the new tokens': keys, values, absolute positions."""
        layer = self.layer
        dev = self.new_keys.device
        idx = layer.index("stream_kv", layer.stream_kv, dev)
        new_k, new_v = self.new_keys.index_select(1, idx), self.new_values.index_select(1, idx)
        new_pos = self._first_position() + torch.arange(self.new_keys.shape[2], device=dev)
        if layer.window_keys is None:
            return new_k, new_v, new_pos
        return (torch.cat([layer.window_keys, new_k], dim=-2), torch.cat([layer.window_values, new_v], dim=-2),
                torch.cat([layer.window_pos, new_pos]))

    def _first_position(self) -> int | Tensor:
        first = self.layer.first_position
        return self.past if first is None else first

    def _keep_window(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Write the new rows (the last ``T`` of ``k``, ``v``, ``pos``) into their ring slots.

        Slot ``s < sink`` holds position ``s``; ring slot ``r`` the latest position ``p >= sink``
        with ``(p - sink) % ring == r``. Each slot takes the new row at that position when the
        step brought one, else keeps its row (or stays empty on the first step)."""
        layer = self.layer
        t = self.new_keys.shape[2]
        old = k.shape[2] - t  # rows of the ring before this step (0 on the first step)
        ring = layer.window - 1
        slots = torch.arange(layer.sink + ring, device=k.device)
        first = self._first_position()
        last = first + t - 1
        if ring > 0:
            r = slots - layer.sink
            latest = layer.sink + r + ring * torch.div(last - layer.sink - r, ring, rounding_mode="floor")
            p = torch.where(slots < layer.sink, slots, latest)
        else:
            p = slots
        fresh = (p >= first) & (p <= last) & ((slots < layer.sink) | (p >= layer.sink))
        keep = slots if old else torch.zeros_like(slots)
        src = torch.where(fresh, old + p - first, keep)
        layer.window_keys = k.index_select(2, src)
        layer.window_values = v.index_select(2, src)
        empty = torch.full_like(slots, EMPTY_POSITION)
        layer.window_pos = torch.where(fresh, p, pos.index_select(0, slots) if old else empty)


EMPTY_POSITION = 2**31 - 1
"""Position of a streaming ring row not written yet: after every query (``j <= p`` fails), so masked."""


class HybridCache(Cache):
    """A transformers cache for a converted model: see the module docstring.

    ``HybridCache(model.config)``; pass it to ``generate`` or ``forward`` as ``cache``
    (transformers 5.25 on) or ``past_key_values`` (before; ``loader.cache_argument(model)`` says
    which). Models loaded with ``hydracc.load`` or after ``import hydracc`` get one by default
    from ``generate`` and from a forward with ``use_cache=True``. ``max_cache_len``: tokens to
    preallocate the full heads' keys and values for (the prompt plus the new tokens); None
    appends by concatenation.
    """

    def __init__(self, config: Any = None, num_layers: int | None = None, max_cache_len: int | None = None) -> None:
        if num_layers is None:
            if config is None:
                raise ValueError("HybridCache needs the model config (or num_layers)")
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = int(text.num_hidden_layers)
        if max_cache_len is not None and int(max_cache_len) < 1:
            raise ValueError(f"max_cache_len must be at least 1, got {max_cache_len}")
        capacity = None if max_cache_len is None else int(max_cache_len)
        super().__init__(layers=[HybridLayer(capacity=capacity) for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes held: cached keys/values of full heads plus linear heads' states."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, HybridLayer))

    def kv_nbytes(self) -> int:
        """Bytes of cached keys and values only (what grows with the sequence; a preallocated
        buffer counts whole)."""
        return sum(layer.kv_nbytes() for layer in self.layers if isinstance(layer, HybridLayer))
