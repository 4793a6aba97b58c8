"""Emit stage: the streamed, atomic checkpoint writer (``writer``) and the converted config's ``hydra``
section built from the rewritten graph (``hydra_section``). Importing this package loads only the writer."""

from hydracc._moved import forward
from hydracc.emit.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointWriter,
    check_destination,
    hydracc_made,
    parse_size,
    swap_into_place,
)

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "CheckpointWriter", "check_destination", "hydracc_made", "parse_size", "swap_into_place"]

# names of the old ``hydracc/emit.py`` module, before the stage folders
__getattr__ = forward(__name__, "hydracc.emit.writer", only=("SINGLE_NAME", "INDEX_NAME"))
