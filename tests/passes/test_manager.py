"""The pass manager: registry, user passes, and the graph check after every pass."""

import pytest
import torch
from helpers import build_tiny_model

from hydracc.errors import PassError
from hydracc.frontend.capture import capture
from hydracc.frontend.model import build_model
from hydracc.passes import PassContext, PassManager, get_pass, pipeline, register_pass, registered_passes


@pytest.fixture
def ctx() -> PassContext:
    return PassContext(capture(build_model(build_tiny_model("llama", 4, 2).config.to_dict())))


def test_builtins_registered() -> None:
    names = {p.name for p in registered_passes()}
    assert {"fold-gqa", "hybridize", "permute-heads"} <= names
    assert pipeline(["mine"]) == ["fold-gqa", "hybridize", "mine", "permute-heads"]
    assert pipeline(permute=False) == ["fold-gqa", "hybridize"]


def test_unknown_pass_names_known_ones() -> None:
    with pytest.raises(PassError, match="fold-gqa"):
        get_pass("no-such-pass")


def test_user_pass_runs_by_name(ctx: PassContext) -> None:
    seen = []

    @register_pass("test-count-nodes", description="count nodes")
    def count(c: PassContext) -> None:
        seen.append(len(c.graph_module.graph.nodes))

    PassManager(["test-count-nodes"]).run(ctx)
    assert seen and seen[0] > 10
    with pytest.raises(ValueError, match="already registered"):
        register_pass("fold-gqa")(count)


def test_broken_graph_is_reported_with_the_pass_name(ctx: PassContext) -> None:
    def break_shapes(c: PassContext) -> None:
        graph = c.graph_module.graph
        node = next(n for n in graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default)
        # feed the values in as queries transposed: the shapes no longer agree
        with graph.inserting_before(node):
            bad = graph.call_function(torch.ops.aten.transpose.int, (node.args[0], 2, 3))
        node.args = (bad, *node.args[1:])
        bad2 = graph.call_function(torch.ops.aten.mm.default, (node.args[0], node.args[0]))
        node.args = (node.args[0], *node.args[1:])
        del bad2

    with pytest.raises(PassError, match="pass 'break_shapes' left a broken graph"):
        PassManager([break_shapes]).run(ctx)


def test_crashing_pass_is_named(ctx: PassContext) -> None:
    def crash(c: PassContext) -> None:
        raise RuntimeError("boom")

    with pytest.raises(PassError, match="pass 'crash' failed: RuntimeError: boom"):
        PassManager([crash]).run(ctx)
