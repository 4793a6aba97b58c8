"""A user-written hydracc pass: keep every head of the first and last layer full.

Many hybrid models keep their outermost layers dense. This pass edits the rewritten
graph directly: it finds the ``hydracc::hybrid_attention`` nodes and sets the head kinds
of the first and last layer to ``full``. What is saved is read from the graph, so the
converted checkpoint follows.

From the command line::

    hydracc convert model/ -o out/ --plugin examples/custom_pass.py --pass keep-ends-full

From Python::

    python examples/custom_pass.py model/ out/
"""

from __future__ import annotations

import sys

from hydracc.frontend.capture import SITE_META
from hydracc.kernels.head_kinds import FULL
from hydracc.passes import PassContext, register_pass
from hydracc.passes.hybridize import hybrid_nodes


@register_pass("keep-ends-full", description="keep all heads of the first and last layer full")
def keep_ends_full(ctx: PassContext) -> None:
    nodes = hybrid_nodes(ctx.graph_module.graph)
    layers = sorted(node.meta[SITE_META] for node in nodes)
    ends = {layers[0], layers[-1]} if layers else set()
    for node in nodes:
        if node.meta[SITE_META] in ends:
            args = list(node.args)
            args[3] = [FULL.code] * len(args[3])
            node.args = tuple(args)
    ctx.notes.append(f"keep-ends-full: layers {sorted(ends)} kept fully full")


def main(argv: list[str]) -> int:
    from hydracc.convert import convert

    if len(argv) != 2:
        print("usage: python examples/custom_pass.py IN_CHECKPOINT OUT_DIR", file=sys.stderr)
        return 2
    result = convert(argv[0], argv[1], full_ratio=0.25, strategy="even", user_passes=["keep-ends-full"])
    print(f"converted with passes {result.rewrite.passes} -> {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
