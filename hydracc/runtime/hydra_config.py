"""The converted checkpoint's ``hydra`` config section: its format, read back and validated.

The writer is ``hydracc.emit.hydra_section`` (from the rewritten graph); this reader needs no
compiler code, so loading a converted checkpoint imports none.

Design decisions:
- The section is derived from the rewritten graph (each ``hybrid_attention`` node's head
  kinds, in the final head order), not from the plan, so what is saved is what the
  graph computes, whatever user passes did after planning. The plan that started it
  is kept alongside for the record.
- Format (``format_version`` 1)::

      "hydra": {"format_version": 1,
                "layers": [{"layer": 0, "module": "model.layers.0.self_attn",
                            "num_heads": 8, "num_kv_heads": 2, "head_dim": 64,
                            "scale": 0.125, "kinds": ["full", "elu", ...],
                            "head_order": [original head index of each head],
                            "head_windows": [sink, window per head] or [],
                            "params": [checkpoint names of the learned parameters] or []},
                           ...],
                "plan": {...}, "passes": [...],
                "provenance": {"hydracc_version": ..., "torch": ..., "transformers": ...,
                               "inputs": {file name: sha256}}}
- ``head_windows`` is the op's argument as saved (streaming heads' sink and window, in
  saved head order); ``params`` names the layer's learned tensors in the op's order
  (``head_kinds.PARAM_NAMES``), stored in the checkpoint under
  ``{module}.hydra.{name}``, rows in saved head order. A layer with params applies
  scale-normalized fusion to its linear heads. Sections written before these keys existed
  read as "no windows, no params".
- ``read_hydra_section`` validates a loaded config before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydracc.errors import CheckpointError
from hydracc.kernels.kinds import KIND_NAMES, PARAM_NAMES, kind_by_name

ATTN_IMPLEMENTATION = "hydracc"
"""The name converted models give transformers' ``attn_implementation`` (the loader registers it)."""

HYDRA_FORMAT_VERSION = 1


@dataclass(frozen=True)
class HydraLayer:
    """One converted layer as the runtime needs it."""

    layer: int
    module: str
    codes: list[int]
    head_windows: list[int]
    params: list[str]
    """Checkpoint names of the learned parameters, in the op's order (empty: none, no fusion)."""

    @property
    def param_attrs(self) -> list[str]:
        """Names of the parameters on the attention module's ``hydra`` submodule."""
        return [name.rsplit(".", 1)[-1] for name in self.params]


def read_hydra_section(config: dict[str, Any], where: str) -> dict[int, list[int]]:
    """Validate the ``hydra`` section of a converted config; return layer -> head kind codes."""
    return {layer: entry.codes for layer, entry in read_hydra_layers(config, where).items()}


def read_hydra_layers(config: dict[str, Any], where: str) -> dict[int, HydraLayer]:
    """Validate the ``hydra`` section of a converted config; return layer -> ``HydraLayer``."""
    section = config.get("hydra")
    if not isinstance(section, dict):
        raise CheckpointError(
            f"{where}: config.json has no 'hydra' section, so this is not a hydracc-converted checkpoint",
            hint="convert it first: hydracc convert IN -o OUT",
        )
    version = section.get("format_version")
    if not isinstance(version, int) or version > HYDRA_FORMAT_VERSION:
        raise CheckpointError(f"{where}: hydra.format_version {version!r} is not supported by this hydracc (max {HYDRA_FORMAT_VERSION})")
    layers = section.get("layers")
    if not isinstance(layers, list) or not layers:
        raise CheckpointError(f"{where}: hydra.layers must be a non-empty list")
    out: dict[int, HydraLayer] = {}
    for i, entry in enumerate(layers):
        path = f"hydra.layers[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("layer"), int):
            raise CheckpointError(f"{where}: {path}.layer must be an integer")
        kinds = entry.get("kinds")
        if not isinstance(kinds, list) or len(kinds) != entry.get("num_heads"):
            raise CheckpointError(f"{where}: {path}.kinds must list one kind per query head")
        for h, name in enumerate(kinds):
            if name not in KIND_NAMES:
                raise CheckpointError(f"{where}: {path}.kinds[{h}] is {name!r}; known kinds: {', '.join(KIND_NAMES)}")
        codes = [kind_by_name(k).code for k in kinds]
        windows = entry.get("head_windows", [])
        if not isinstance(windows, list) or (windows and len(windows) != 2 * len(kinds)) or not all(
            isinstance(w, int) and w >= 0 for w in windows
        ):
            raise CheckpointError(f"{where}: {path}.head_windows must be empty or two non-negative integers per head")
        if any(kind_by_name(k).windowed for k in kinds) and not windows:
            raise CheckpointError(f"{where}: {path} has streaming heads but no head_windows")
        params = entry.get("params", [])
        expected = [f"{entry.get('module')}.hydra.{name}" for name in PARAM_NAMES]
        # a later kind appends its names to PARAM_NAMES: an older checkpoint stores a leading part
        if not isinstance(params, list) or params != expected[: len(params)]:
            raise CheckpointError(f"{where}: {path}.params must be [] or a leading part of {expected}")
        if not params and any(kind_by_name(k).learned for k in kinds):
            raise CheckpointError(f"{where}: {path} has learned head kinds but no params")
        needed = [n for k in dict.fromkeys(kinds) for n in kind_by_name(k).params]
        absent = [n for n in needed if f"{entry.get('module')}.hydra.{n}" not in params]
        if absent:
            raise CheckpointError(f"{where}: {path}.params lacks {', '.join(absent)}, which its head kinds need")
        out[entry["layer"]] = HydraLayer(entry["layer"], str(entry.get("module")), codes, list(windows), list(params))
    return out
