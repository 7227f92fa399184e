"""graph.build's quantizer: quantizing each float linear as the graph is built gives the graph that quantizing
the float graph's weights afterwards and building again gives (what int4 from float weights did before,
holding a float32 copy of every weight), a tied Llama head's table looked up from the head's own blocks."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from grains_edge.export import graph, quantize
from tests.conftest import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantizing_while_building_equals_quantizing_the_float_graph(arch) -> None:
    model = tiny_model(arch)
    spec = graph.graph_spec(model)
    made: list[str] = []

    def quantizer(name: str, weight: np.ndarray):
        made.append(name)
        return quantize.int4_block(name, weight)

    built = graph.build(model, spec, [1, 2], separate_head=True, quantizer=quantizer)
    float_graph = graph.build(model, spec, [1, 2], separate_head=True)
    afterwards = {name: quantize.int4_block(name, weight) for name, weight in quantize.graph_weights(float_graph)}
    rebuilt = graph.build(model, spec, [1, 2], separate_head=True, blocks=afterwards)

    assert sorted(made) == sorted(afterwards)  # each linear once, the tied head included
    assert [(n.op_type, list(n.input)) for n in built.graph.node] == [
        (n.op_type, list(n.input)) for n in rebuilt.graph.node
    ]
    ours = {t.name: numpy_helper.to_array(t) for t in built.graph.initializer}
    theirs = {t.name: numpy_helper.to_array(t) for t in rebuilt.graph.initializer}
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    if arch == "llama":  # a tied table looked up from the head's blocks (GPT-2's graph keeps its float wte)
        assert "GatherBlockQuantized" in {n.op_type for n in built.graph.node}
