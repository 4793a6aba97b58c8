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
- Linear heads keep ``S = sum phi(k) v^T`` and ``z = sum phi(k)`` in fp32 per query head
  (``reference.causal_linear_attention_step``), so decoding with the cache equals
  recomputing the whole sequence (tests check it).
- ``get_seq_length`` counts tokens seen, not cached rows, so positions and masks are right
  even for a layer that caches nothing.
- Cropping (assisted decoding) cannot undo a linear state and is refused; batch reordering
  (beam search) and repetition apply to every tensor of the layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from hydracc.errors import HydraError
from hydracc.kernels.head_kinds import kind_by_code
from hydracc.kernels.reference import causal_linear_attention_step


class HybridLayer(DynamicLayer):
    """One attention layer's share of a ``HybridCache``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.seen = 0
        self.kinds: list[int] | None = None
        self.full_heads: list[int] = []
        self.linear_heads: list[int] = []
        self.cached_kv: list[int] = []
        self.grouped_full = False
        self.state: Tensor | None = None
        self.norm: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[HybridStep, HybridStep]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = HybridStep(self, key_states, value_states, self.seen)
        self.seen += key_states.shape[-2]
        return step, step

    def configure(self, kinds: list[int], num_heads: int, num_kv_heads: int) -> None:
        if self.kinds is not None:
            if list(kinds) != self.kinds:
                raise HydraError("a HybridCache layer was used with two different head-kind layouts; use one cache per model")
            return
        group = num_heads // num_kv_heads
        for code in kinds:
            kind = kind_by_code(code)
            if kind.linear and kind.name != "elu":  # pragma: no cover - until more linear kinds exist
                raise HydraError(f"the hybrid cache does not support head kind {kind.name!r} yet")
        self.kinds = list(kinds)
        self.full_heads = [h for h, c in enumerate(kinds) if kind_by_code(c).keeps_kv]
        self.linear_heads = [h for h, c in enumerate(kinds) if kind_by_code(c).linear]
        if len(self.full_heads) + len(self.linear_heads) != len(kinds):  # pragma: no cover - a kind that is neither
            raise HydraError("the hybrid cache handles full and linear heads only; this layer has another kind")
        self.cached_kv = sorted({h // group for h in self.full_heads})
        # SDPA can read the cached heads unexpanded (enable_gqa) when the i-th block of full heads
        # uses the i-th cached KV head and all blocks have the same size
        per = len(self.full_heads) // max(1, len(self.cached_kv))
        self.grouped_full = (
            bool(self.full_heads)
            and per * len(self.cached_kv) == len(self.full_heads)
            and all(h // group == self.cached_kv[i // per] for i, h in enumerate(self.full_heads))
        )

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.state, self.norm) if isinstance(t, Tensor))

    def _each(self, fn: Any) -> None:
        for name in ("keys", "values", "state", "norm"):
            t = getattr(self, name)
            if isinstance(t, Tensor) and t.dim() > 0:
                setattr(self, name, fn(t))

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
        self.keys = self.values = self.state = self.norm = None
        self.seen = 0
        self.is_initialized = False


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

    def attend(self, query: Tensor, kinds: list[int], scale: float) -> Tensor:
        """Hybrid attention of ``query`` ``[B, Hq, T, D]`` over everything seen; returns ``[B, Hq, T, Dv]``."""
        layer = self.layer
        b, hq, tq, _ = query.shape
        hkv = self.new_keys.shape[1]
        layer.configure(kinds, hq, hkv)
        group = hq // hkv
        out = query.new_empty(b, hq, tq, self.new_values.shape[-1])
        if layer.cached_kv:
            idx = torch.tensor(layer.cached_kv, device=query.device)
            new_k, new_v = self.new_keys.index_select(1, idx), self.new_values.index_select(1, idx)
            if layer.keys is None or layer.keys.dim() == 0 or layer.keys.numel() == 0:
                layer.keys, layer.values = new_k, new_v
            else:
                layer.keys = torch.cat([layer.keys, new_k], dim=-2)
                layer.values = torch.cat([layer.values, new_v], dim=-2)
        if layer.full_heads:
            heads = torch.tensor(layer.full_heads, device=query.device)
            qf = query.index_select(1, heads)
            if layer.grouped_full:  # every cached KV head serves the same number of full heads, in order
                k, v, gqa = layer.keys, layer.values, len(layer.cached_kv) < len(layer.full_heads)
            else:  # uneven: expand the cached heads to one per full head
                pos = {kv: i for i, kv in enumerate(layer.cached_kv)}
                kv_of = torch.tensor([pos[h // group] for h in layer.full_heads], device=query.device)
                k, v, gqa = layer.keys.index_select(1, kv_of), layer.values.index_select(1, kv_of), False
            tk = k.shape[2]
            extra = {"enable_gqa": True} if gqa else {}
            if tq == tk:  # prefill from empty: plain causal
                full = F.scaled_dot_product_attention(qf, k, v, is_causal=True, scale=scale, **extra)
            elif tq == 1:  # one decode step sees every key
                full = F.scaled_dot_product_attention(qf, k, v, scale=scale, **extra)
            else:  # a chunk after earlier tokens: causal, aligned bottom-right
                mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(diagonal=tk - tq)
                full = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, scale=scale, **extra)
            out.index_copy_(1, heads, full.to(out.dtype))
        if layer.linear_heads:
            heads = torch.tensor(layer.linear_heads, device=query.device)
            kv_of = heads // group
            lin, layer.state, layer.norm = causal_linear_attention_step(
                query.index_select(1, heads), self.new_keys.index_select(1, kv_of), self.new_values.index_select(1, kv_of),
                layer.state, layer.norm,
            )
            out.index_copy_(1, heads, lin.to(out.dtype))
        return out


class HybridCache(Cache):
    """A transformers cache for a converted model: see the module docstring.

    ``HybridCache(model.config)``; pass it as ``past_key_values`` to ``generate`` or
    ``forward`` (models loaded with ``hydracc.load`` or after ``import hydracc`` get one from
    ``generate`` by default).
    """

    def __init__(self, config: Any = None, num_layers: int | None = None) -> None:
        if num_layers is None:
            if config is None:
                raise ValueError("HybridCache needs the model config (or num_layers)")
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            num_layers = int(text.num_hidden_layers)
        super().__init__(layers=[HybridLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes held: cached keys/values of full heads plus linear heads' states."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, HybridLayer))

    def kv_nbytes(self) -> int:
        """Bytes of cached keys and values only (what grows with the sequence)."""
        return sum(
            sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, Tensor))
            for layer in self.layers
            if isinstance(layer, HybridLayer)
        )
