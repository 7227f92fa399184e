"""A bfloat16 checkpoint kept in bfloat16 (sources.load(keep_bfloat16=True), what a quantized export loads):
the same fingerprint and the same graph as the float32 load of the same folder, and an int4 export of it
verifies against its bfloat16 reference."""

from __future__ import annotations

import numpy as np
import torch
from onnx import numpy_helper

from grains_edge.export import graph
from grains_edge.export.onnx_export import MIN_EFFECT_CORRELATION, export
from grains_edge.model import sources
from tests.conftest import tiny_model


def bfloat16_folder(tmp_path, tokenizer):
    folder = tmp_path / "bf16"
    tiny_model("llama", len(tokenizer)).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_kept_bfloat16_is_the_float32_load_in_half_the_bytes(tmp_path, tiny_tokenizer) -> None:
    folder = bfloat16_folder(tmp_path, tiny_tokenizer)
    wide, _ = sources.load(str(folder))
    kept, _ = sources.load(str(folder), keep_bfloat16=True)
    assert wide.dtype == torch.float32 and kept.dtype == torch.bfloat16
    assert sources.fingerprint(kept) == sources.fingerprint(wide)

    def initializers(model) -> dict[str, np.ndarray]:
        proto = graph.build(model, graph.graph_spec(model), [1, 2])
        return {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}

    ours, theirs = initializers(kept), initializers(wide)  # weights, norms and rope tables
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)


def test_float32_checkpoint_stays_float32(tmp_path, tiny_model_dir) -> None:
    model, _ = sources.load(str(tiny_model_dir), keep_bfloat16=True)
    assert model.dtype == torch.float32


def test_int4_export_of_a_bfloat16_checkpoint_verifies(tmp_path, tiny_tokenizer) -> None:
    folder = bfloat16_folder(tmp_path, tiny_tokenizer)
    manifest = export(str(folder), tmp_path / "int4", layers_spec="1-2", quantize="int4")
    wide, _ = sources.load(str(folder))
    assert manifest.weights_fingerprint == sources.fingerprint(wide)
    assert manifest.verification["steering_effect_correlation"] >= MIN_EFFECT_CORRELATION["int4"]
