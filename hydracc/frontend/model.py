"""Build a transformers model for a checkpoint's config, and check the weights fit it.

Design decisions:
- The model class comes from transformers' own registry by ``model_type``
  (``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``) with
  ``trust_remote_code=False``: nothing from a checkpoint is ever executed.
- Models for capture and planning are built with parameters on the ``meta`` device and
  buffers on the CPU (like accelerate's ``init_empty_weights``): no weight memory is
  used, yet computed buffers such as RoPE's ``inv_freq`` stay real so the captured graph
  can later run with real weights streamed in.
- ``match_weights`` maps model weight names to checkpoint names and compares shapes from the safetensors headers with the
  model built from the config, before any tensor is read, so a checkpoint that does
  not match its config fails in seconds with the offending tensors named.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from hydracc.frontend.capture import AttentionSite
    from hydracc.frontend.checkpoint import Checkpoint
from hydracc.errors import CheckpointError, UnsupportedModelError

_KNOWN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def load_config(config: dict[str, Any]):  # -> transformers.PretrainedConfig
    """Turn a parsed ``config.json`` into a transformers config object for its ``model_type``."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise CheckpointError(
            "config.json has no 'model_type'",
            hint="a Hugging Face causal-LM config names its architecture, e.g. \"model_type\": \"llama\"",
        )
    if "hydra" in config:
        raise CheckpointError(
            "this checkpoint is already converted by hydracc (config.json has a 'hydra' section): its linear heads "
            "would be read as softmax heads",
            hint="convert (or analyze) the original checkpoint instead; its files' sha256 are in hydra.provenance.inputs",
        )
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not an architecture transformers knows",
            hint=f"hydracc builds models from transformers' own classes (tested: {', '.join(_KNOWN_FAMILIES)}); "
            "remote code is never run",
        )
    check_decoder_only(model_type, config)
    check_sizes(config)
    check_rope(config)
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    try:
        with _rope_warnings() as warned, quiet_transformers():
            cfg = AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # transformers' own validation (strict dataclass fields, architecture checks)
        raise CheckpointError(
            f"config.json is not a valid {model_type!r} config: {_first_line(exc)}",
            hint="check config.json against the weights it came with (head counts, hidden size, types)",
        ) from exc
    missing = [m for m in warned if "Missing required" in m]
    if missing:  # the rotary tables cannot be built from it
        raise CheckpointError(f"config.json: transformers rejects its RoPE parameters: {missing[0]}", hint=_ROPE_HINT)
    for message in warned:  # out of transformers' range but computable: said before the work, not refused
        import warnings

        warnings.warn(f"config.json: transformers warns about its RoPE parameters: {message} (hydracc goes on; the "
                      "rotary tables are checked to be finite: check the values against the model's own card)",
                      stacklevel=2)
    return cfg


_ROPE_HINT = ("fix rope_theta / rope_scaling (or rope_parameters) in config.json: they must be the values the model "
              "was trained with (e.g. rope_theta 10000.0 or 500000.0; a scaling factor >= 1)")
_ROPE_POSITIVE = ("rope_theta", "factor", "attention_factor", "partial_rotary_factor")
"""RoPE fields that must be finite numbers > 0 where a config gives them (``partial_rotary_factor`` also <= 1)."""
_ROPE_FINITE = ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
"""RoPE fields that must be finite numbers where a config gives them (null: the default)."""
_ROPE_REFUSED = ("must", "Missing required")
"""What marks a transformers RoPE warning as a value out of its range (``... field must be a float or int >= 1, got
0.5``, a missing ``factor``): said as a hydracc warning before the work (a missing key is an error; values that make the
tables non-finite or non-positive are refused by ``check_rope`` and ``check_rotary_buffers``). The others are advice
(unrecognized keys some families store, yarn's factor against ``max_position_embeddings /
original_max_position_embeddings``) and stay transformers' log lines."""


def check_rope(config: dict[str, Any]) -> None:
    """Refuse RoPE parameters that make the rotary tables non-finite or meaningless, naming the field:
    ``rope_theta`` and the scaling ``factor`` (and the other numbers ``rope_scaling`` /
    ``rope_parameters`` may hold, nested per layer type or not) must be finite and positive."""
    where: list[tuple[str, dict[str, Any]]] = [("", config)]
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise CheckpointError(f"config.json: {key} is {value!r}; it must be an object (or null)", hint=_ROPE_HINT)
        nested = [k for k, v in value.items() if isinstance(v, dict)]
        if nested:
            where += [(f"{key}.{k}.", value[k]) for k in nested]
        else:
            where.append((f"{key}.", value))
    for prefix, fields in where:
        for name in _ROPE_POSITIVE + _ROPE_FINITE if prefix else ("rope_theta", "partial_rotary_factor"):
            if fields.get(name) is None:  # absent or null: transformers' default (or its own warning below)
                continue
            value = fields[name]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value):
                raise CheckpointError(f"config.json: {prefix}{name} is {value!r}; it must be a finite number",
                                      hint=_ROPE_HINT)
            if name in _ROPE_POSITIVE and value <= 0:
                raise CheckpointError(f"config.json: {prefix}{name} is {value!r}; it must be greater than 0",
                                      hint=_ROPE_HINT)
            if name == "partial_rotary_factor" and value > 1:
                raise CheckpointError(f"config.json: {prefix}{name} is {value!r}; it must be at most 1 (the whole head)",
                                      hint=_ROPE_HINT)
        for name in ("short_factor", "long_factor"):
            value = fields.get(name) if prefix else None
            if value is not None and not (isinstance(value, list) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in value)):
                raise CheckpointError(f"config.json: {prefix}{name} must be a list of finite numbers > 0, got {value!r}",
                                      hint=_ROPE_HINT)


@contextlib.contextmanager
def _rope_warnings() -> Iterator[list[str]]:
    """Collect what transformers' RoPE validation warns about (it only logs), whatever its verbosity."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if record.levelno >= logging.WARNING and any(word in message for word in _ROPE_REFUSED):
                found.append(message)
            elif record.levelno >= effective and logger.parent is not None:  # advice: logged as transformers would
                logger.parent.handle(record)

    logger = logging.getLogger("transformers.modeling_rope_utils")
    handler, level, propagate, effective = Collect(), logger.level, logger.propagate, logger.getEffectiveLevel()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # what it refuses is reported as an error, not logged as well
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def check_rotary_buffers(model: nn.Module) -> None:
    """The rotary tables built from the config must be finite (a last check behind ``check_rope``)."""
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1].endswith("inv_freq") and buf.is_floating_point() and not bool(buf.isfinite().all()):
            raise CheckpointError(
                f"the rotary frequencies built from config.json ({name}) are not finite",
                hint=_ROPE_HINT,
            )
    for name, module in model.named_modules():
        scaling = getattr(module, "attention_scaling", None)
        if isinstance(scaling, (int, float)) and not math.isfinite(scaling):
            raise CheckpointError(f"the RoPE attention scaling built from config.json ({name}) is {scaling}",
                                  hint=_ROPE_HINT)


_DECODER_HINT = (f"hydracc converts decoder-only language models with causal attention ({', '.join(_KNOWN_FAMILIES)}, "
                 "...); convert the causal-LM version of the model, if it has one")


def check_decoder_only(model_type: str, config: dict[str, Any]) -> None:
    """Refuse encoder (BERT, RoBERTa, ...) and encoder-decoder (T5, BART, ...) models by name, before transformers builds
    a causal-LM head they do not have (and the weights are reported as missing)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    arch = config.get("architectures")
    named = f" ({', '.join(map(str, arch))})" if isinstance(arch, list) and arch else ""
    if config.get("is_encoder_decoder") is True:
        raise UnsupportedModelError(f"model_type {model_type!r}{named} is an encoder-decoder model: encoder-decoder "
                                    "models are not supported", hint=_DECODER_HINT)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and config.get("is_decoder") is not True:
        raise UnsupportedModelError(f"model_type {model_type!r}{named} is an encoder model (bidirectional attention): "
                                    "encoder models are not supported", hint=_DECODER_HINT)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' warnings and notes (``If you want to use BertLMHeadModel as a standalone ...``) off stderr
    while hydracc builds its models: what matters reaches the user as hydracc's own error; errors still show."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


SIZE_KEYS = (
    "hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
    "vocab_size", "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_layer", "n_positions", "n_inner",
)
"""Config keys that size the model: when present (and not null) each must be a positive integer."""


def check_sizes(config: dict[str, Any]) -> None:
    """Refuse sizes that are not positive integers before transformers turns them into tensor shapes."""
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(
                f"config.json: {key} is {value!r}; it must be a positive integer",
                hint="check config.json against the weights it came with",
            )
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise CheckpointError(
            f"config.json: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})",
            hint="each KV head serves the same number of query heads; check config.json",
        )


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[:2]).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device while buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__)
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(kwargs)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_model(config: dict[str, Any], *, attn_implementation: str = "sdpa", on_meta: bool = True,
                dtype: Any = None) -> nn.Module:
    """The transformers causal-LM model for ``config``, in eval mode.

    With ``on_meta`` the parameters live on the meta device (no memory, no data); the
    caller streams real weights in where it needs them. ``dtype``: the floating dtype to
    build in (default: the config's), which is the dtype a captured graph computes in.
    """
    from transformers import AutoModelForCausalLM

    cfg = load_config(config)
    ctx = parameters_on_meta() if on_meta else contextlib.nullcontext()
    try:
        with ctx, warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(
                cfg, attn_implementation=attn_implementation, trust_remote_code=False,
                **({"dtype": dtype} if dtype is not None else {}),
            )
    except ValueError as exc:
        raise UnsupportedModelError(
            f"transformers has no causal-LM class for model_type {cfg.model_type!r}: {exc}",
            hint="hydracc converts decoder-only language models (AutoModelForCausalLM)",
        ) from exc
    except (RuntimeError, TypeError, KeyError, ZeroDivisionError, AssertionError) as exc:  # shapes, activations the config names
        raise CheckpointError(
            f"transformers cannot build a {cfg.model_type!r} model from config.json: {_first_line(exc)}",
            hint="check config.json against the weights it came with (head counts, hidden size)",
        ) from exc
    check_rotary_buffers(model)
    return model.eval()


def expected_weights(model: nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names and shapes the checkpoint must hold, and the tied names that may be left out.

    Returns ``(shapes, tied)`` where ``tied`` maps a parameter name to the name of the
    parameter it shares storage with (e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``).
    """
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    first_name: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in first_name:
            tied[name] = first_name[key]
        else:
            first_name[key] = name
    return shapes, tied


def match_weights(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Map each weight the model needs to the checkpoint tensor holding it, or raise ``CheckpointError``.

    Follows what transformers' own loader accepts: names saved from the base model (no
    ``base_model_prefix``, e.g. GPT-2 checkpoints with ``h.0.attn...``) get the prefix;
    tensors transformers ignores on load (``_keys_to_ignore_on_load_unexpected``, such as
    GPT-2's ``attn.bias`` masks, and non-persistent buffers like RoPE's ``inv_freq``) are
    dropped; tied weights (``lm_head.weight``) may be absent. Shapes are compared from the
    headers. Returns ``{model name: checkpoint name}``.
    """
    shapes, tied = expected_weights(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    # Buffers the model computes itself (RoPE's inv_freq...); old checkpoints may hold stale copies,
    # sometimes under an older module path, so they are matched by their last name component.
    buffer_leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} - {n.rsplit(".", 1)[-1] for n in shapes}
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    for ck_name in checkpoint.names():
        candidates = [ck_name, f"{prefix}.{ck_name}" if prefix else ck_name]
        if prefix and ck_name.startswith(prefix + "."):
            candidates.append(ck_name[len(prefix) + 1 :])
        name = next((c for c in candidates if c in shapes), None)
        if name is not None and name not in mapping:
            mapping[name] = ck_name
        elif any(p.search(ck_name) for p in ignore) or ck_name.rsplit(".", 1)[-1] in buffer_leaves:
            continue
        else:
            unexpected.append(ck_name)
    names: list[str] = []
    shapes_wrong: list[str] = []
    for name, shape in shapes.items():
        if name not in mapping:
            if not (name in tied and tied[name] in mapping):
                names.append(f"missing tensor {name} (expected shape {list(shape)})")
            continue
        got = tuple(checkpoint.info(mapping[name]).shape)
        if got != shape:
            shapes_wrong.append(f"tensor {mapping[name]} has shape {list(got)} but config.json implies {list(shape)}")
    names += [f"unexpected tensor {n} (the {model.config.model_type} model has no such weight)" for n in unexpected]
    problems = shapes_wrong + names
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        hint = (
            "check that config.json belongs to these weights (head counts, hidden size, number of layers)"
            if shapes_wrong
            else f"the tensor names do not follow transformers' layout for model_type {model.config.model_type!r}"
        )
        raise CheckpointError(f"the weights in {checkpoint.root} do not match config.json:\n  {shown}{more}", hint=hint)
    return mapping


def check_runtime_support(config: dict[str, Any], sites: Sequence[AttentionSite]) -> None:
    """Raise ``UnsupportedModelError`` unless a converted model of this config can run the hybrid.

    Builds the model on meta tensors with ``attn_implementation="hydracc"`` (so families that
    pick attention classes by their own table, like Falcon, fail here, before conversion) and
    checks that every site's module exposes the ``layer_idx`` the attention function uses.
    """
    from hydracc.runtime.hydra_config import ATTN_IMPLEMENTATION

    try:
        model = build_model(config, attn_implementation=ATTN_IMPLEMENTATION)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # transformers raises KeyError/ValueError for unsupported backends
        raise UnsupportedModelError(
            f"the {config.get('model_type')} model class cannot use a custom attention function "
            f"({type(exc).__name__}: {exc}), so a converted checkpoint could not run",
            hint="hydracc needs model classes that call transformers' AttentionInterface (Llama, Mistral, Qwen, GPT-2 ...)",
        ) from exc
    if not getattr(model, "_supports_attention_backend", True):
        raise UnsupportedModelError(
            f"the {config.get('model_type')} model class does not support custom attention functions",
            hint="hydracc needs model classes that call transformers' AttentionInterface",
        )
    modules = dict(model.named_modules())
    for site in sites:
        module = modules.get(site.module)
        if module is None or getattr(module, "layer_idx", None) != site.layer:
            raise UnsupportedModelError(
                f"attention module {site.module} does not carry layer_idx={site.layer}, which the hybrid "
                "runtime uses to find each layer's head kinds",
            )
