"""Emit stage: the streamed, atomic checkpoint writer (``writer``) and the converted config's ``hydra``
section built from the rewritten graph (``hydra_section``). Importing this package loads only the writer."""

from hydracc.emit.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointWriter,
    check_destination,
    hydracc_made,
    parse_size,
    swap_into_place,
)

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "CheckpointWriter", "check_destination", "hydracc_made", "parse_size", "swap_into_place"]
