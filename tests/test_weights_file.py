"""export/weights_file.py: a graph whose weights were written to disk while it was built is the graph that
onnx.save_model writes from memory, weight for weight and logit for logit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from grains_edge.export import graph, graph_io
from tests.conftest import tiny_model


def session_logits(path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    num_layers = sum(name.endswith(".key") for name in names)
    kv_heads, head_dim = session.get_inputs()[names.index(graph_io.past_names(num_layers)[0])].shape[1::2]
    ids = np.arange(1, 9)[None]  # [1, 8]
    steering = np.random.default_rng(0).normal(0, 1, (1, num_layers, 64)).astype(np.float32)
    feed = {
        graph_io.INPUT_IDS: ids,
        graph_io.ATTENTION_MASK: np.ones_like(ids),
        graph_io.POSITION_IDS: np.arange(8)[None],
        graph_io.STEERING: steering,
        graph_io.LOGITS_TO_KEEP: graph_io.ALL_POSITIONS,
        **dict.fromkeys(graph_io.past_names(num_layers), np.zeros((1, kv_heads, 0, head_dim), np.float32)),
    }
    return session.run([graph_io.LOGITS], feed)[0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weights_written_while_building_equal_the_saved_graph(tmp_path, arch) -> None:
    model = tiny_model(arch)
    spec = graph.graph_spec(model)
    in_memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    in_memory.mkdir()
    streamed.mkdir()
    proto = graph.build(model, spec, [1, 2])
    onnx.save_model(proto, in_memory / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    proto = graph.build(model, spec, [1, 2], weights_file=streamed / "model.onnx.data")
    assert not any(t.HasField("raw_data") and len(t.raw_data) >= 1024 for t in proto.graph.initializer)
    onnx.save_model(proto, streamed / "model.onnx")

    def weights(folder) -> dict[str, np.ndarray]:
        loaded = onnx.load(str(folder / "model.onnx"))
        return {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}

    expected, written = weights(in_memory), weights(streamed)
    assert expected.keys() == written.keys()
    for name, value in expected.items():
        assert written[name].dtype == value.dtype and np.array_equal(written[name], value), name
    np.testing.assert_array_equal(session_logits(streamed / "model.onnx"), session_logits(in_memory / "model.onnx"))
