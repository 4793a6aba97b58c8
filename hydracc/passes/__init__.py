"""Graph passes over the captured model; importing this package registers the built-ins.

The default pipeline is ``DEFAULT_PIPELINE``; user passes registered with
``register_pass`` run between ``hybridize`` and ``permute-heads``.
"""

from collections.abc import Sequence

from hydracc.passes import fold_gqa, hybridize, permute_heads  # noqa: F401  (registers the passes)
from hydracc.passes.manager import (
    PassContext,
    PassFn,
    PassManager,
    RegisteredPass,
    check_graph,
    get_pass,
    register_pass,
    registered_passes,
)

BUILTIN_BEFORE = ("fold-gqa", "hybridize")
BUILTIN_AFTER = ("permute-heads",)


def pipeline(user_passes: Sequence[str | PassFn] = (), *, permute: bool = True) -> list[str | PassFn]:
    """The passes to run: built-ins, then the user's (names or functions), then head permutation."""
    return [*BUILTIN_BEFORE, *user_passes, *(BUILTIN_AFTER if permute else ())]


__all__ = [
    "PassContext",
    "PassFn",
    "PassManager",
    "RegisteredPass",
    "check_graph",
    "get_pass",
    "pipeline",
    "register_pass",
    "registered_passes",
]
