"""Run a converted checkpoint: transformers' model class with hydracc's hybrid attention.

Design decisions:
- The converted model is the original transformers class; only its attention function
  changes. ``hybrid_attention_forward`` is registered with transformers'
  ``AttentionInterface`` as ``"hydracc"`` and calls ``torch.ops.hydracc.hybrid_attention``,
  the same op the rewritten graph calls, with the head kinds of the layer taken from the
  config's ``hydra`` section (``module.layer_idx``).
- The op is causal by construction and takes no mask. transformers' mask is read for padding
  only (``left_padding``): right padding needs nothing outside generation (no real token sees
  a later one); left padding runs the op once per padded row over its real tokens (exact for
  every kind, streaming windows included, at B launches instead of one); with the hybrid
  cache the padding is the cache's to honour (``HybridStep.attend``). Any other mask (not
  causal, holes in a row) raises ``PaddingNotSupportedError`` instead of being ignored.
- Learned head parameters (fusion scales, hedgehog feature maps, gdn gates) live in a
  ``HybridHeads`` submodule named ``hydra`` on each converted attention module, so their
  checkpoint names are ``{module}.hydra.{name}`` and transformers' own loader fills them.
  The submodules are attached by a wrapper around ``PreTrainedModel.post_init`` (the end of
  every model's ``__init__``), active only for configs with a ``hydra`` section and the
  ``"hydracc"`` attention, so ``hydracc.load`` and plain Auto loading build the same model.
- Generation: ``generate`` gets a ``hydracc.runtime.cache.HybridCache`` by default for these models
  (a wrapper around transformers' cache preparation, active only when the attention is
  ``"hydracc"``); its layers hand the attention function a ``HybridStep`` instead of
  tensors, and a preallocated buffer for the full heads' keys and values as long as the
  generation (``max_cache_length``). A forward called with ``use_cache=True`` and no cache gets
  one too (a forward pre-hook on the base model, the module whose forward would make a
  ``DynamicCache``); a forward that leaves ``use_cache`` to the config is left alone (it runs the
  op, as evaluation does). With any other cache (a ``DynamicCache`` passed by the caller) linear
  heads are recomputed from the cached keys: correct, not memory-saving.
- transformers 5.25 renamed the cache argument ``past_key_values`` to ``cache`` (the old name
  warns); ``cache_argument(model)`` gives the name the installed version takes, and the two
  wrappers above look for the cache under either name.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hydracc.kernels  # noqa: F401  (registers hydracc::hybrid_attention)
from hydracc.errors import CheckpointError, PaddingNotSupportedError  # (re-exported: raised here)
from hydracc.runtime.hydra_config import ATTN_IMPLEMENTATION, HydraLayer, read_hydra_layers


def hybrid_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q ``[B, Hq, T, D]``, unexpanded k/v ``[B, Hkv, S, D]``."""
    entry: HydraLayer | None = getattr(module, "_hydracc_layer", None)
    if entry is None:
        layers = read_hydra_layers(module.config.to_dict(), "model config")
        layer = getattr(module, "layer_idx", None)
        if layer not in layers:
            raise CheckpointError(f"attention module for layer {layer} has no entry in the hydra section")
        entry = layers[layer]
        module._hydracc_layer = entry
    codes = entry.codes
    params: list[torch.Tensor] = []
    if entry.params:
        heads = getattr(module, "hydra", None)
        if not isinstance(heads, HybridHeads):
            raise CheckpointError(
                f"layer {entry.layer} needs learned head parameters, but its attention module has none attached",
                hint="load converted checkpoints with hydracc.load(OUT), or AutoModelForCausalLM after `import hydracc`",
            )
        params = heads.op_params()
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    cached = hasattr(key, "attend")  # a HybridStep (hydracc.runtime.cache; importing it here costs each step)
    pads = None
    if attention_mask is not None and not torch.compiler.is_compiling():
        pads = left_padding(attention_mask, query.shape[2], key.shape[2], cached=cached)
    if cached:  # generating with a HybridCache: full heads cached, linear heads stateful
        out = key.attend(query, codes, float(scale), params, entry.head_windows, pads=pads)
    elif pads is not None:
        out = _padded_rows(query, key, value, pads, codes, float(scale), params, entry.head_windows)
    else:
        if query.shape[2] < key.shape[2] and not torch.compiler.is_compiling():
            _warn_recompute(codes)
        out = torch.ops.hydracc.hybrid_attention(query, key, value, codes, float(scale), params, entry.head_windows)
    return out.transpose(1, 2).contiguous(), None


_warned_recompute = False


def _warn_recompute(codes: list[int]) -> None:
    """Once per process: decoding through another cache (a ``DynamicCache`` from a plain forward) recomputes every
    non-full head over the whole context at each step: correct, but as slow as no cache and as large as full KV."""
    global _warned_recompute
    if _warned_recompute or all(c == 0 for c in codes):
        return
    _warned_recompute = True
    import warnings

    warnings.warn("hydracc: this step's cache is not a HybridCache, so the linear and streaming heads are recomputed "
                  "over the whole context (slow, and the cache holds every head's keys); call the first forward with "
                  "use_cache=True, pass hydracc.HybridCache(model.config), or use model.generate()", stacklevel=3)


def _padded_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pads: torch.Tensor, codes: list[int],
                 scale: float, params: list[torch.Tensor], head_windows: list[int]) -> torch.Tensor:
    """The op once per row over the row's real tokens (keys from ``pads[row]``); zeros at pad queries."""
    tq, tk = query.shape[2], key.shape[2]
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    for row, pad in enumerate(pads.tolist()):
        first = max(0, pad - (tk - tq))  # the first real query (queries are the last tq keys)
        if first >= tq:
            continue
        sl = slice(row, row + 1)
        out[sl, :, first:] = torch.ops.hydracc.hybrid_attention(
            query[sl, :, first:].contiguous(), key[sl, :, pad:].contiguous(), value[sl, :, pad:].contiguous(), codes,
            scale, params, head_windows,
        )
    return out


def left_padding(mask: torch.Tensor, tq: int, tk: int, *, cached: bool = False) -> torch.Tensor | None:
    """Left-pad keys per row of transformers' mask ``[B, 1, tq, tk]`` (bool or additive), None when none.

    Accepted: causal attention over each row's real keys, which form one run (left pads before
    it; right pads after it only when not ``cached``: a real token never sees a later one, but
    generation would go on from the pads). Query rows of pad tokens are not checked (their
    outputs are never read by a real token). Anything else raises ``PaddingNotSupportedError``.
    """
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if allowed.dim() != 4 or allowed.shape[-2:] != (tq, tk) or not bool((allowed == allowed[:, :1]).all()):
        raise PaddingNotSupportedError(f"attention mask of shape {tuple(mask.shape)} is not one causal mask per row "
                                       f"over {tq} queries and {tk} keys")
    allowed = allowed[:, 0]
    valid = allowed.any(dim=1)  # [B, tk]: keys some query sees
    j = torch.arange(tk, device=mask.device)
    lead = (~valid).int().cumprod(dim=-1).sum(dim=-1)
    end = lead + valid.sum(dim=-1)
    one_run = bool((valid == ((j >= lead[:, None]) & (j < end[:, None]))).all())
    causal = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).tril(diagonal=tk - tq)
    real_query = valid[:, tk - tq:, None]
    causal_ok = bool(((allowed == (causal & valid[:, None, :])) | ~real_query).all())
    if not one_run or not causal_ok:
        raise PaddingNotSupportedError(
            "this batch's attention mask is not causal attention over each row's tokens (holes inside a row, or a "
            "non-causal mask); the hybrid runtime supports plain causal attention with left or right padding",
            hint="pass an attention mask of 1s for tokens and 0s for padding, with the padding at one end",
        )
    if cached and bool((end < tk).any()):
        raise PaddingNotSupportedError(
            "right padding while generating: the next tokens would follow the pad tokens",
            hint="pad on the left for generation (tokenizer.padding_side = 'left')",
        )
    return lead if bool((lead > 0).any()) else None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hybrid_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers
        pass
    _use_hybrid_cache_in_generate()
    _attach_learned_params_on_init()


class HybridHeads(nn.Module):
    """A converted layer's learned head parameters, in the op's ``head_params`` order.

    Created empty (the loader fills them from ``{module}.hydra.{name}``); ``op_params``
    returns them as the op takes them. ``names`` may be a leading part of ``PARAM_NAMES``
    (a checkpoint written before a kind added its names): the rest are zeros the
    checkpoint neither holds nor gets, read only by heads of kinds it cannot contain.
    """

    def __init__(self, names: Sequence[str], num_heads: int, head_dim: int) -> None:
        super().__init__()
        from hydracc.kernels.kinds import PARAM_NAMES, param_shapes

        shapes = param_shapes(num_heads, head_dim)
        self.names = list(PARAM_NAMES)
        self.stored = [name for name in self.names if name in set(names)]
        self.shapes = {name: shapes[name] for name in self.names}
        for name in self.stored:
            self.register_parameter(name, nn.Parameter(torch.zeros(shapes[name]), requires_grad=False))
        self._zeros: dict[torch.device, dict[str, torch.Tensor]] = {}

    def op_params(self) -> list[torch.Tensor]:
        if len(self.stored) == len(self.names):
            return [getattr(self, name) for name in self.names]
        first = getattr(self, self.stored[0])  # zeros beside the stored ones, made here: never uninitialised memory
        zeros = self._zeros.setdefault(first.device, {})
        for name in self.names:
            if name not in self.stored and name not in zeros:
                zeros[name] = torch.zeros(self.shapes[name], device=first.device)
        return [getattr(self, name) if name in self.stored else zeros[name] for name in self.names]


def attach_learned_params(model: nn.Module, layers: dict[int, HydraLayer] | None = None) -> int:
    """Give every converted attention module of ``model`` its ``hydra`` submodule; return how many.

    Module names in the section are relative to the causal-LM model; inside the base model
    (``AutoModel``, or the inner model transformers initialises first) the
    ``base_model_prefix`` is dropped. Does nothing (returns 0) when the modules are not there.
    """
    config = model.config.to_dict()
    if layers is None:
        layers = read_hydra_layers(config, "model config")
    wanted = [entry for entry in layers.values() if entry.params]
    modules = dict(model.named_modules())
    prefix = f"{getattr(model, 'base_model_prefix', '')}."

    def find(name: str) -> nn.Module | None:
        if name in modules:
            return modules[name]
        return modules.get(name.removeprefix(prefix)) if prefix != "." and name.startswith(prefix) else None

    if not wanted or any(find(entry.module) is None for entry in wanted):
        return 0
    section = {int(e["layer"]): e for e in config["hydra"]["layers"]}
    for entry in wanted:
        module = find(entry.module)
        assert module is not None
        if not isinstance(getattr(module, "hydra", None), HybridHeads):
            info = section[entry.layer]
            module.hydra = HybridHeads(entry.param_attrs, int(info["num_heads"]), int(info["head_dim"]))
    # fusion scales, feature maps and gates stay fp32 under a bf16/fp16 model ("strict": for bf16 too)
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    model._keep_in_fp32_modules_strict = keep | {"hydra"}
    return len(wanted)


def _attach_learned_params_on_init() -> None:
    """Wrap ``PreTrainedModel.post_init`` so converted models get their ``hydra`` submodules."""
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:  # pragma: no cover
        return
    original = PreTrainedModel.post_init
    if getattr(original, "_hydracc_wrapped", False):
        return

    def post_init(self: Any, *args: Any, **kwargs: Any) -> Any:
        config = getattr(self, "config", None)
        if (
            config is not None
            and isinstance(getattr(config, "hydra", None), dict)
            and getattr(config, "_attn_implementation", None) in (ATTN_IMPLEMENTATION, "hydracc_export")
        ):
            attach_learned_params(self)
        if config is not None and isinstance(getattr(config, "hydra", None), dict):
            _hybrid_cache_in_forward(self)  # (checks the attention at each call: it can be switched later)
            if "tensor_sha256" in config.hydra:  # checked before loading; a model saved again (cast, fine-tuned)
                config.hydra = {k: v for k, v in config.hydra.items() if k != "tensor_sha256"}  # makes no claim
        return original(self, *args, **kwargs)

    post_init._hydracc_wrapped = True  # type: ignore[attr-defined]
    PreTrainedModel.post_init = post_init


CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names transformers has taken the cache by: ``cache`` from 5.25 on, ``past_key_values`` before."""


def cache_argument(model: nn.Module) -> str:
    """The keyword the model's ``forward`` (and so ``generate``) takes its cache by on this transformers."""
    params = inspect.signature(type(model).forward).parameters  # (follows transformers' decorators' __wrapped__)
    return next((name for name in CACHE_ARGUMENTS if name in params), "past_key_values")


def _use_hybrid_cache_in_generate() -> None:
    """Make ``generate`` give converted models a ``HybridCache`` instead of a ``DynamicCache``.

    Wraps ``GenerationMixin._prepare_cache_for_generation``: after transformers prepared its
    cache, a plain ``DynamicCache`` for a model whose attention is ``"hydracc"`` is replaced by
    a ``HybridCache``. Caches the caller passed, other cache implementations and other models
    are left alone. The cache is looked for under each of ``CACHE_ARGUMENTS``.
    """
    try:
        from transformers.cache_utils import DynamicCache
        from transformers.generation.utils import GenerationMixin
    except ImportError:  # pragma: no cover
        return
    original = getattr(GenerationMixin, "_prepare_cache_for_generation", None)
    if original is None or getattr(original, "_hydracc_wrapped", False):
        return
    signature = inspect.signature(original)

    def prepare(self: Any, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        passed = any(model_kwargs.get(n) is not None for n in CACHE_ARGUMENTS)  # the caller's (5.4 marks it not)
        result = original(self, generation_config, model_kwargs, *args, **kwargs)
        if passed:
            return result
        try:  # the tokens generate will hold (prompt + new tokens - 1): the full heads' buffer size
            length = signature.bind(self, generation_config, model_kwargs, *args, **kwargs).arguments.get("max_cache_length")
        except TypeError:  # pragma: no cover - another transformers signature
            length = None
        name = next((n for n in CACHE_ARGUMENTS if model_kwargs.get(n) is not None), None)
        cache = model_kwargs.get(name) if name is not None else None
        if (
            getattr(self.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
            and getattr(generation_config, "cache_implementation", None) in (None, "dynamic")
            and type(cache) is DynamicCache
            and not getattr(cache, "_is_user_defined", False)
            and cache.get_seq_length() == 0
        ):
            from hydracc.runtime.cache import HybridCache

            model_kwargs[name] = HybridCache(
                self.config, max_cache_len=int(length) if isinstance(length, int) and length > 0 else None
            )
        return result

    prepare._hydracc_wrapped = True  # type: ignore[attr-defined]
    GenerationMixin._prepare_cache_for_generation = prepare


def _hybrid_cache_in_forward(model: nn.Module) -> None:
    """Give a converted base model's forward a ``HybridCache`` when called with ``use_cache=True`` and no cache.

    transformers' base models (``LlamaModel``, ...) make a ``DynamicCache`` inside their forward
    when asked for a cache and given none; a forward pre-hook puts a ``HybridCache`` in its place
    first. Only ``use_cache=True`` passed by the caller counts (the causal-LM model passes it
    through): a forward that leaves it to the config makes no hybrid cache, so evaluation and
    padded forwards keep running the op. The attention is checked at each call. Registered once,
    on the base model only (a causal-LM model's ``base_model`` is its inner model).
    """
    if getattr(model, "_hydracc_cache_hook", False) or getattr(model, "base_model", model) is not model:
        return
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover
        return
    names = [p.name for p in params]
    cache_name = next((name for name in CACHE_ARGUMENTS if name in names), None)
    if cache_name is None or "use_cache" not in names:
        return
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def given(args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        at = positional.index(name) if name in positional else len(args)
        return args[at] if at < len(args) else None

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if getattr(module.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            return None
        if given(args, kwargs, "use_cache") is not True or any(given(args, kwargs, n) is not None for n in CACHE_ARGUMENTS):
            return None
        if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
            return None  # (transformers turns the cache off here)
        from hydracc.runtime.cache import HybridCache

        cache = HybridCache(module.config)
        at = positional.index(cache_name) if cache_name in positional else len(args)
        if at < len(args):
            args = (*args[:at], cache, *args[at + 1:])
        else:
            kwargs = {**{k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS}, cache_name: cache}
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)
    model._hydracc_cache_hook = True


_register()


def check_weight_digests(root: Path, config: dict[str, Any]) -> None:
    """The weights of the converted folder ``root`` against the digests its config records (``runtime.integrity``)."""
    from hydracc.frontend.checkpoint import open_checkpoint
    from hydracc.runtime.integrity import check_tensor_digests

    ck = open_checkpoint(root)
    try:
        check_tensor_digests(root, config, ck.files)
    finally:
        ck.close()


def check_converted(path: str | os.PathLike[str]) -> tuple[Path, dict[int, HydraLayer], dict[str, Any]]:
    """Validate a converted checkpoint before transformers reads it: the path, its files (headers, sizes:
    the checks ``convert`` makes of its input), the ``hydra`` section, and that the learned parameters
    it names are in the weights. Returns the folder, its layers and its config."""
    from hydracc.frontend.checkpoint import open_checkpoint

    ck = open_checkpoint(path)
    try:
        root = ck.root
        layers = read_hydra_layers(ck.config, str(root))
        check_config(ck.config)
        wanted = [name for entry in layers.values() for name in entry.params]
        missing = sorted(set(wanted) - set(ck.names()))
    finally:
        ck.close()
    if missing:
        raise CheckpointError(
            f"{root}: config.json names learned head parameters that the weights do not hold: {', '.join(missing[:4])}"
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""),
            hint="the checkpoint is incomplete; convert it again",
        )
    return root, layers, ck.config


def check_config(config: dict[str, Any]) -> None:
    """The checks ``convert`` makes of its input's config (positive integer sizes, heads that divide,
    transformers' own validation), for a config about to be loaded; a ``CheckpointError`` if not."""
    from hydracc.frontend.model import load_config

    load_config({k: v for k, v in config.items() if k != "hydra"})


def from_pretrained(root: Path, config: dict[str, Any], *, allow_nonfinite: bool = False, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` after :func:`check_config`, no remote code, local files only;
    what transformers cannot build from the files is bad input (a ``CheckpointError``), not a crash, and
    so are weights holding NaN or infinity unless ``allow_nonfinite``."""
    from transformers import AutoModelForCausalLM

    check_config(config)
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=False, local_files_only=True, **kwargs)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
        if isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc):
            raise  # the machine, not the files
        first = " ".join(str(exc).split("\n")[:2]).strip()
        raise CheckpointError(f"{root}: transformers could not build the model from its files: {type(exc).__name__}: {first}",
                              hint="check config.json against the weights it came with") from exc
    if not allow_nonfinite:
        check_finite(model, root)
    return model


def check_finite(model: nn.Module, root: Path) -> None:
    """Refuse a model whose weights hold NaN or infinity (the first such tensor is named)."""
    from hydracc.frontend.checkpoint import count_nonfinite

    for name, tensor in model.named_parameters():
        if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # (fp8 has no isfinite)
            bad = count_nonfinite(tensor.detach())
            if bad:
                raise CheckpointError(
                    f"{root}: weight {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()} (as {tensor.dtype})",
                    hint="the checkpoint is damaged, or its values overflow the dtype asked for (every output would "
                    "be meaningless); if this is intended, pass --allow-nonfinite",
                )


def quiet_transformers() -> None:
    """No per-tensor "Loading weights" bars from transformers: hydracc shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load(path: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
         allow_nonfinite: bool = False, check_hashes: bool = True) -> nn.Module:
    """Load a converted checkpoint folder; the returned model's forward runs the hybrid.

    ``dtype`` defaults to the dtype the weights are stored in. Weights holding NaN or infinity are
    refused (a ``CheckpointError``) unless ``allow_nonfinite``; so are weights that differ from the
    digests the conversion recorded (edited after conversion), unless ``check_hashes=False``.
    """
    root, _, config = check_converted(path)
    if check_hashes:
        check_weight_digests(root, config)
    model = from_pretrained(root, config, allow_nonfinite=allow_nonfinite, attn_implementation=ATTN_IMPLEMENTATION,
                            dtype=dtype if dtype is not None else "auto")
    return model.to(device).eval()
