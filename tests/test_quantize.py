"""int4 from float weights (export/quantize.py): each quantizer's blocks against the float weight and against an
independent path to the same numbers (a plain numpy rounding, ONNX Runtime's own MatMulNBits), and an int4
export of a tiny random model whose graph computes the quantizer's weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoModelForCausalLM

from grains_edge.export import gguf_blocks, quantize
from grains_edge.export.manifest import Manifest
from grains_edge.export.onnx_export import export, run_graph


def weight(rows: int = 48, cols: int = 256, seed: int = 0) -> np.ndarray:
    """[rows, cols] float32 with heavy tails (Student t, 4 degrees of freedom), as trained weights have."""
    return (np.random.default_rng(seed).standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)


def weighted_block_errors(w: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """Per block of 32 [N * K/32]: sum over the block of (RMS of the block + |w|) * (approx - w)^2, in float64."""
    x = w.astype(np.float64).reshape(-1, 32)
    importance = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
    return (importance * (approx.astype(np.float64).reshape(-1, 32) - x) ** 2).sum(-1)


def plain_min_max(w: np.ndarray) -> np.ndarray:
    """Q4_1 by min and max written out block by block: d = (max - min)/15, m = min, float16 fields."""
    out = np.empty(w.shape, np.float64)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], 32):
            block = w[row, start : start + 32].astype(np.float64)
            d = np.float16((block.max() - block.min()) / 15)
            m = np.float16(block.min())
            levels = np.clip(np.rint((block - float(m)) / float(d)), 0, 15)
            out[row, start : start + 32] = levels * float(d) + float(m)
    return out


def test_min_max_is_the_plain_rounding():
    w = weight()
    np.testing.assert_allclose(quantize.q4_1_min_max(w).dequantized(), plain_min_max(w), rtol=0, atol=1e-7)


def test_search_beats_or_equals_min_max_on_every_block_and_by_far_overall():
    w = weight()
    searched = weighted_block_errors(w, quantize.q4_1_search(w).dequantized())
    min_max = weighted_block_errors(w, plain_min_max(w))
    assert np.all(searched <= min_max * (1 + 1e-6))
    assert searched.sum() < 0.9 * min_max.sum()
    relative = np.linalg.norm(quantize.q4_1_search(w).dequantized() - w) / np.linalg.norm(w)
    assert relative < 0.1  # 16 levels over a heavy-tailed block


def test_search_levels_are_the_nearest_for_the_stored_fields():
    w = weight(seed=1)
    blocks = quantize.q4_1_search(w)
    _, d, m = gguf_blocks.q4_1_fields(blocks)
    d64 = np.repeat(d.astype(np.float64), 32, axis=1)  # [N, K]
    m64 = np.repeat(m.astype(np.float64), 32, axis=1)
    nearest = np.clip(np.rint((w - m64) / d64), 0, 15)
    np.testing.assert_array_equal(blocks.q, nearest)
    np.testing.assert_array_equal(blocks.dequantized(), (blocks.q * d64 + m64).astype(np.float32))


def test_search_recovers_weights_already_on_a_q4_1_grid():
    """Dequantized Q4_1 blocks (as the default model's layers are) come back exactly."""
    rng = np.random.default_rng(2)
    levels = rng.integers(0, 16, (16, 8, 32))
    levels[..., 0], levels[..., 1] = 0, 15  # each block spans its grid, as Q4_1's min/max rounding makes it
    d = rng.uniform(1e-3, 1e-2, (16, 8, 1)).astype(np.float16).astype(np.float64)
    m = -rng.uniform(0, 0.05, (16, 8, 1)).astype(np.float16).astype(np.float64)
    w = (levels * d + m).reshape(16, 256).astype(np.float32)
    np.testing.assert_array_equal(quantize.q4_1_search(w).dequantized(), w)


def test_constant_and_zero_blocks_stay_exact():
    w = np.zeros((2, 64), np.float32)
    w[1, :32] = 0.25
    for quantizer in (quantize.q4_1_search, quantize.q4_1_min_max, quantize.q8_symmetric):
        np.testing.assert_array_equal(quantizer(w).dequantized(), w)


def test_q8_symmetric_is_within_half_a_step():
    w = weight(seed=3)
    blocks = quantize.q8_symmetric(w)
    step = np.repeat(blocks.scales, 32, axis=1)
    assert blocks.bits == 8 and blocks.offsets is None
    assert np.all(np.abs(blocks.dequantized() - w) <= step / 2 * (1 + 1e-5))


def matmul_nbits_output(w: np.ndarray, x: np.ndarray, config) -> np.ndarray:
    """x @ w^T through a MatMul graph quantized by ONNX Runtime's own MatMulNBitsQuantizer (float activations)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    quantizer = MatMulNBitsQuantizer(model, **config)
    quantizer.process()
    session = ort.InferenceSession(quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("name", ["ort-rtn-symmetric", "ort-rtn-asymmetric", "ort-hqq"])
def test_onnx_runtime_quantizers_read_back_as_its_own_kernel_computes_them(name):
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    w = weight(rows=40, cols=128, seed=4)
    x = np.random.default_rng(5).normal(size=(3, 128)).astype(np.float32)
    configs = {
        "ort-rtn-symmetric": {"bits": 4, "block_size": 32, "is_symmetric": True},
        "ort-rtn-asymmetric": {"bits": 4, "block_size": 32, "is_symmetric": False},
        "ort-hqq": {"algo_config": HQQWeightOnlyQuantConfig(block_size=32, bits=4)},
    }
    theirs = matmul_nbits_output(w, x, configs[name])
    ours = x @ quantize.LINEAR_QUANTIZERS[name](w).dequantized().T
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
    assert np.linalg.norm(ours - x @ w.T) < 0.15 * np.linalg.norm(x @ w.T)


def dequantized_model(folder):
    """The tiny model with each linear replaced by its int4 export's weights, by the quantizers applied to
    PyTorch's own nn.Linear weights (graph.py stacks them, so the names and row order are not shared)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                quantizer = quantize.HEAD if name == "lm_head" else quantize.LINEAR_QUANTIZERS[quantize.LINEAR]
                module.weight.copy_(torch.from_numpy(quantizer(module.weight.numpy()).dequantized()))
    return model


def test_int4_export_of_float_weights_computes_the_quantized_weights(tmp_path, tiny_model_dir):
    """ORT on the int4 graph vs PyTorch with the quantized weights: only the kernels' int8 activations apart,
    several times closer than to the float model."""
    if "llama" not in tiny_model_dir.name:
        pytest.skip("one family is enough: GPT-2's Conv1D linears are not nn.Linear")
    manifest = export(str(tiny_model_dir), tmp_path / "int4", layers_spec="1-2", quantize="int4")
    assert manifest.weights == "17 quantized from float (q4_1-search: 16 4-bit Q4_1, 1 8-bit)"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False).graph.node]
    assert "MatMul" not in ops and ops.count("GatherBlockQuantized") == 1  # the tied table from the 8-bit head
    if manifest.kernels == "fused":
        assert ops.count("Q4_1MatMul") == 4 * 4 and ops.count("MatMulNBits") == 1
    session = ort.InferenceSession(
        str(tmp_path / "int4" / "model.onnx"), _kernel_options(manifest), providers=["CPUExecutionProvider"]
    )
    ids = torch.from_numpy(np.random.default_rng(6).integers(0, 250, (2, 9)))
    steering = torch.zeros(2, manifest.num_layers, manifest.hidden_size)
    ours = run_graph(session, manifest, ids, steering)
    with torch.no_grad():
        quantized = dequantized_model(tiny_model_dir)(input_ids=ids).logits.numpy()
        original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits.numpy()
    to_quantized, to_float = np.abs(ours - quantized).max(), np.abs(ours - original).max()
    assert to_quantized < 0.05 * np.abs(quantized).max() and to_quantized < to_float / 4


def _kernel_options(manifest: Manifest) -> ort.SessionOptions:
    from grains_edge import kernels

    options = ort.SessionOptions()
    if manifest.kernels == "fused":
        kernels.register(options)
    return options
