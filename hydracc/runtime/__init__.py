"""Runtime: load a converted checkpoint and run it (``loader``: the attention function registered with
transformers; ``cache``: the hybrid cache for generation; ``hydra_config``: the converted config's
format). Nothing here imports the compiler (front end, analysis, planning, passes, emit)."""

from hydracc.runtime.loader import ATTN_IMPLEMENTATION, load, quiet_transformers

__all__ = ["ATTN_IMPLEMENTATION", "load", "quiet_transformers"]
