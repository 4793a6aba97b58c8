"""A user-written hydracc pass: keep every head of the first and last layer full.

Many hybrid models keep their outermost layers dense. This pass edits the rewritten
graph through ``HybridCall``, the typed view of each ``hydracc::hybrid_attention`` call
(``ctx.hybrid_calls()`` lists them in layer order): it sets the head kinds of the first
and last layer to ``full`` and reports how many layers it changed (``ctx.count``; shown in
``--json`` and with ``HYDRACC_DEBUG_GRAPH=1``). What is saved is read from the graph, so
the converted checkpoint follows.

From the command line::

    hydracc convert model/ -o out/ --plugin examples/custom_pass.py --pass keep-ends-full

From Python::

    python examples/custom_pass.py model/ out/
"""

from __future__ import annotations

import sys

from hydracc.passes import PassContext, register_pass


@register_pass("keep-ends-full", description="keep all heads of the first and last layer full")
def keep_ends_full(ctx: PassContext) -> None:
    calls = ctx.hybrid_calls()  # HybridCall views, in layer order
    ends = {calls[0].layer, calls[-1].layer} if calls else set()
    for call in calls:
        if call.layer in ends:
            if call.full_heads() != list(range(call.num_heads)):
                ctx.count("layers_made_full")
                ctx.count("heads_made_full", call.num_heads - len(call.full_heads()))
            call.set_kinds(["full"] * call.num_heads)
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
