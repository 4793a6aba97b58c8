"""Build a transformers model for a checkpoint's config, and check the weights fit it.

Design decisions:
- The model class comes from transformers' own registry by ``model_type``
  (``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``) with
  ``trust_remote_code=False``: nothing from a checkpoint is ever executed.
- Models for capture and planning are built with parameters on the ``meta`` device and
  buffers on the CPU (like accelerate's ``init_empty_weights``): no weight memory is
  used, yet computed buffers such as RoPE's ``inv_freq`` stay real so the captured graph
  can later run with real weights streamed in.
- ``check_weights`` compares names and shapes from the safetensors headers with the
  model built from the config, before any tensor is read, so a checkpoint that does
  not match its config fails in seconds with the offending tensors named.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from hydracc.checkpoint import Checkpoint
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
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "hydra")}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not an architecture transformers knows",
            hint=f"hydracc builds models from transformers' own classes (tested: {', '.join(_KNOWN_FAMILIES)}); "
            "remote code is never run",
        ) from exc
    except TypeError as exc:
        raise CheckpointError(f"config.json does not fit model_type {model_type!r}: {exc}") from exc


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


def build_model(config: dict[str, Any], *, attn_implementation: str = "sdpa", on_meta: bool = True) -> nn.Module:
    """The transformers causal-LM model for ``config``, in eval mode.

    With ``on_meta`` the parameters live on the meta device (no memory, no data); the
    caller streams real weights in where it needs them.
    """
    from transformers import AutoModelForCausalLM

    cfg = load_config(config)
    ctx = parameters_on_meta() if on_meta else contextlib.nullcontext()
    try:
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(
                cfg, attn_implementation=attn_implementation, trust_remote_code=False
            )
    except ValueError as exc:
        raise UnsupportedModelError(
            f"transformers has no causal-LM class for model_type {cfg.model_type!r}: {exc}",
            hint="hydracc converts decoder-only language models (AutoModelForCausalLM)",
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


def check_weights(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Raise ``CheckpointError`` unless the checkpoint's tensors are exactly what the model needs."""
    shapes, tied = expected_weights(model)
    present = set(checkpoint.names())
    problems: list[str] = []
    for name, shape in shapes.items():
        if name not in present:
            if name in tied and tied[name] in present:
                continue
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
            continue
        got = tuple(checkpoint.info(name).shape)
        if got != shape:
            problems.append(f"tensor {name} has shape {list(got)} but config.json implies {list(shape)}")
    for name in sorted(present - set(shapes)):
        problems.append(f"unexpected tensor {name} (the {model.config.model_type} model has no such weight)")
    if problems:
        shown = "\n  ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(
            f"the weights in {checkpoint.root} do not match config.json:\n  {shown}{more}",
            hint="check that config.json belongs to these weights (head counts, hidden size, number of layers)",
        )
