"""The captured graph run one layer at a time: the same logits as the whole graph, each weight read once."""

from __future__ import annotations

import pytest
import torch

from hydracc.analysis.layerwise import Runner, forward_sweep, split_by_layer, suffix_logits
from hydracc.convert import inspect_checkpoint


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2-mha", "qwen3-mqa", "mistral-gqa"])
def test_segments_reproduce_the_whole_graph(tiny_checkpoint, name) -> None:
    insp = inspect_checkpoint(tiny_checkpoint(name), capture_shape=(2, 12))
    cap = insp.captured
    graph = split_by_layer(cap, cap.graph_on(torch.device("cpu")))
    assert [s.name for s in graph.segments] == ["prefix", "layer 0", "layer 1", "suffix"]
    reads: list[str] = []

    def read(name: str) -> torch.Tensor:
        reads.append(name)
        return insp.read_weight(name)

    runner = Runner(graph, cap, read, torch.device("cpu"), torch.float32)
    batches = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    sweep = forward_sweep(runner, batches)
    layer_weights = {name for seg in graph.layers for name in seg.weight_names}
    assert sorted(r for r in reads if r in layer_weights) == sorted(layer_weights)  # once each, for all batches
    weights = runner.load(graph.suffix)
    everything = insp.load_weights()
    for ids, env in zip(batches, sweep.boundaries[graph.suffix.index]):
        torch.testing.assert_close(suffix_logits(runner, weights, env), cap.run(everything, ids), rtol=0, atol=0)
    largest = max(sum(everything[n].numel() * 4 for n in seg.weight_names) for seg in graph.segments)
    assert runner.peak_segment_bytes == largest


def test_each_layer_segment_holds_its_own_site(tiny_checkpoint) -> None:
    insp = inspect_checkpoint(tiny_checkpoint("llama-gqa"), capture_shape=(2, 12))
    graph = split_by_layer(insp.captured, insp.captured.graph_module)
    for seg, site in zip(graph.layers, insp.captured.sites):
        assert seg.layer == site.layer
        assert all(name.startswith(f"model.layers.{site.layer}.") for name in seg.weight_names)
