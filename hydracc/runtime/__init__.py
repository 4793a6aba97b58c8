"""Runtime: load a converted checkpoint and run it (``loader``: the attention function registered with
transformers; ``cache``: the hybrid cache for generation; ``hydra_config``: the converted config's
format). Nothing here imports the compiler (front end, analysis, planning, passes, emit)."""

from hydracc._moved import forward
from hydracc.runtime.loader import ATTN_IMPLEMENTATION, load, quiet_transformers

__all__ = ["ATTN_IMPLEMENTATION", "load", "quiet_transformers"]

# names of the old ``hydracc/runtime.py`` module, before the stage folders
__getattr__ = forward(__name__, "hydracc.runtime.loader", "hydracc.errors", "hydracc.frontend.model", only=(
    "hybrid_attention_forward", "HybridHeads", "attach_learned_params", "PaddingNotSupportedError",
    "check_runtime_support"))
