"""Graph passes over the captured model; importing this package registers the built-ins.

The default pipeline is ``pipeline()``: ``fold-gqa, hybridize, <user passes>, permute-heads``;
user passes registered with ``register_pass`` run between ``hybridize`` and ``permute-heads``.

Writing a pass: a pass is ``fn(ctx: PassContext) -> None``. It reads and edits attention sites
through ``HybridCall`` views (``ctx.hybrid_calls()`` or ``hybrid_calls(graph_module)``, in layer
order), never through ``node.args`` by position, and reports what it changed with
``ctx.count(name, n)``::

    from hydracc.passes import PassContext, register_pass

    @register_pass("keep-first-full", description="keep every head of layer 0 full")
    def keep_first_full(ctx: PassContext) -> None:
        for call in ctx.hybrid_calls():
            if call.layer == 0 and call.full_heads() != list(range(call.num_heads)):
                call.set_kinds(["full"] * call.num_heads)
                ctx.count("layers_made_full")

``HybridCall`` reads ``q``/``k``/``v``, ``codes``/``kinds``/``head_kinds``, ``scale``,
``params``/``param_nodes``, ``windows``/``raw_windows``, ``layer``, ``num_heads``,
``num_kv_heads``, ``group_size``, ``head_order``; it writes with ``set_kinds``, ``set_kind``,
``set_windows``, ``set_params``, ``set_scale``, ``set_inputs``, ``reorder_heads`` (validated,
``PassError`` on a bad edit). ``PassManager.counts`` holds every pass's counts after a run.
"""

from collections.abc import Sequence

from hydracc.passes import fold_gqa, hybridize, permute_heads  # noqa: F401  (registers the passes)
from hydracc.passes.hybrid_call import (
    HEAD_ORDER_META,
    HYBRID_OP,
    HybridCall,
    SdpaCall,
    check_hybrid_calls,
    hybrid_calls,
    is_hybrid_call,
    sdpa_sites,
)
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
    "HEAD_ORDER_META",
    "HYBRID_OP",
    "HybridCall",
    "SdpaCall",
    "check_hybrid_calls",
    "hybrid_calls",
    "is_hybrid_call",
    "sdpa_sites",
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
