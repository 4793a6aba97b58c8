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
    check_sizes(config)
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map")}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as exc:  # transformers' own validation (strict dataclass fields, architecture checks)
        raise CheckpointError(
            f"config.json is not a valid {model_type!r} config: {_first_line(exc)}",
            hint="check config.json against the weights it came with (head counts, hidden size, types)",
        ) from exc


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
        with ctx, warnings.catch_warnings():
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
