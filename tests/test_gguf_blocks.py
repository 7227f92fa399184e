"""A GGUF's quantized blocks carried into MatMulNBits: parity with gguf-py's reference dequantizer and,
through a whole exported graph, with PyTorch on the same (dequantized) weights."""

import numpy as np
import onnx
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from grains_edge import kernels
from grains_edge.errors import GrainsError
from grains_edge.export import graph, onnx_export
from grains_edge.export.gguf_blocks import (
    Blocks,
    GgufBlocks,
    block_sum_indicator,
    decode,
    folded,
    offset_columns,
    q4_1_fields,
    stacked,
    unpermute_rows,
)
from tests.test_gguf_k_quants import random_blocks


def ggml_bytes(weight: np.ndarray, kind: str) -> np.ndarray:
    return quants.quantize(weight.astype(np.float32), GGMLQuantizationType[kind])  # [N, bytes per row]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_dequantize_exactly_as_the_reference(kind):
    weight = np.random.default_rng(0).normal(size=(6, 96)).astype(np.float32)
    raw = ggml_bytes(weight, kind)
    blocks = decode(kind, raw)
    np.testing.assert_array_equal(blocks.dequantized(), quants.dequantize(raw, GGMLQuantizationType[kind]))
    assert blocks.packed().shape == (6, 3, 32 if kind == "Q8_0" else 16)
    assert decode("Q2_K", raw) is None  # other formats are left to the quantizer


def test_four_bit_packing_is_matmulnbits_order():
    q = np.arange(32, dtype=np.uint8)[None] % 16  # one row, one block: levels 0..15, 0..15
    blocks = Blocks(4, q, np.ones((1, 1), np.float32))
    packed = blocks.packed()
    assert packed[0, 0, 0] == 0 | (1 << 4) and packed[0, 0, 7] == 14 | (15 << 4)
    np.testing.assert_array_equal(blocks.dequantized(), q - 8.0)  # MatMulNBits' default zero point


def test_unpermute_matches_transformers_reverse_permutation():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reverse = LlamaTensorProcessor()._reverse_permute_weights
    rows = np.random.default_rng(1).integers(0, 16, size=(16, 32)).astype(np.uint8)
    blocks = Blocks(4, rows, np.arange(16, dtype=np.float32)[:, None])
    ours = unpermute_rows(blocks, heads=4)
    reference = reverse(rows, 4, 4)
    np.testing.assert_array_equal(ours.q, reference)
    np.testing.assert_array_equal(ours.scales[:, 0], reverse(np.arange(16.0), 4))


def test_stacking_mixed_formats_widens_them_exactly():
    """Q4_1 (4 bits, offsets) beside Q8_0 (8 bits): one 8-bit weight with offsets, the same rows."""
    weight = np.random.default_rng(5).normal(size=(4, 64)).astype(np.float32)
    parts = [decode(kind, ggml_bytes(weight, kind)) for kind in ("Q4_1", "Q8_0")]
    both = stacked(parts)
    assert (both.bits, both.block_size, both.offsets is not None, both.kinds) == (8, 32, True, ("Q4_1", "Q8_0"))
    np.testing.assert_array_equal(both.dequantized(), np.concatenate([p.dequantized() for p in parts]))
    assert stacked(parts[:1]).offsets.shape == (4, 2) and stacked(parts[1:]).offsets is None


def test_gguf_bytes_follow_their_rows_through_permutation_and_stacking():
    """A Q6_K weight keeps its GGUF bytes (which Q6_KMatMul reads) row for row with its levels: un-permuted
    and stacked they still decode to the blocks; beside another format there are none to read."""
    gate, up = (decode("Q6_K", random_blocks("Q6_K", 8, 256, size=1.0, seed=seed)) for seed in range(2))
    q8_0 = decode("Q8_0", ggml_bytes(np.random.default_rng(6).normal(size=(8, 256)), "Q8_0"))
    both = stacked([unpermute_rows(gate, heads=2), up])
    again = decode("Q6_K", both.raw)
    np.testing.assert_array_equal(again.q, both.q)
    np.testing.assert_array_equal(again.scales, both.scales)
    assert stacked([gate, q8_0]).raw is None and q8_0.raw is None  # no kernel reads Q8_0 bytes


def test_block_sum_indicator_gives_the_block_sums_once_per_digit():
    cols = 96  # 3 blocks
    indicator = block_sum_indicator(cols)
    x = np.random.default_rng(2).normal(size=(4, cols))
    sums = x @ indicator.dequantized().T  # [4, offset_columns]
    block_sums = x.reshape(4, 3, 32).sum(-1)
    assert sums.shape == (4, offset_columns(cols)) == (4, 64)
    np.testing.assert_allclose(sums[:, :3], block_sums)
    np.testing.assert_allclose(sums[:, 32:35], block_sums)
    assert not sums[:, 3:32].any() and not sums[:, 35:].any()


@pytest.mark.parametrize("cols", [96, 1536])  # one group of offsets, and two (48 blocks)
def test_folded_offsets_reproduce_the_q4_1_weight(cols):
    """[x, block sums] @ folded^T is x @ w^T with the offsets to 8 bits: within 1/224 of each group's
    largest offset per block sum, far below Q4_1's own rounding."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(8, cols)).astype(np.float32) + rng.normal(size=(8, 1)).astype(np.float32)
    blocks = decode("Q4_1", ggml_bytes(weight, "Q4_1"))
    extended = folded(blocks)
    assert extended.offsets is None and extended.shape == (8, cols + offset_columns(cols))
    x = rng.normal(size=(5, cols))
    x_aug = np.concatenate([x, x @ block_sum_indicator(cols).dequantized().T], axis=1)
    ours, exact = x_aug @ extended.dequantized().T, x @ blocks.dequantized().T
    bound = np.abs(blocks.offsets).max() / 224 * np.abs(x.reshape(5, -1, 32).sum(-1)).sum(-1, keepdims=True)
    assert (np.abs(ours - exact) <= bound).all()
    assert np.abs(ours - exact).max() > 0  # offsets are rounded, not carried: the bound is what is tested


@pytest.fixture
def q4_1_llama(tmp_path, tiny_tokenizer):
    """A tiny Llama whose linears are Q4_1 (head Q8_0) like the embedded GGUF, saved with the
    dequantized weights, and the blocks graph.py should use for it."""
    from tests.conftest import tiny_model

    model = tiny_model("llama", len(tiny_tokenizer))
    blocks = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            groups = {
                "qkv": [attn.q_proj, attn.k_proj, attn.v_proj],
                "o_proj": [attn.o_proj],
                "gate_up": [mlp.gate_proj, mlp.up_proj],
                "down_proj": [mlp.down_proj],
            }
            for name, linears in groups.items():
                parts = [decode("Q4_1", ggml_bytes(linear.weight.numpy(), "Q4_1")) for linear in linears]
                for linear, part in zip(linears, parts, strict=True):
                    linear.weight.copy_(torch.from_numpy(part.dequantized()))
                blocks[f"layers.{i}.{name}"] = stacked(parts)
        head = decode("Q8_0", ggml_bytes(model.lm_head.weight.numpy(), "Q8_0"))
        model.lm_head.weight.copy_(torch.from_numpy(head.dequantized()))  # tied: the embedding too
        blocks["lm_head"] = head
    model.save_pretrained(tmp_path / "q4_1")
    tiny_tokenizer.save_pretrained(tmp_path / "q4_1")
    return tmp_path / "q4_1", blocks


@pytest.mark.parametrize(
    ("level", "tolerance", "correlation"),
    [(1, 0.02, 0.999), (4, onnx_export.QUANTIZED_TOLERANCE["int8"], onnx_export.MIN_EFFECT_CORRELATION["int8"])],
)
def test_exported_blocks_match_pytorch(tmp_path, monkeypatch, q4_1_llama, level, tolerance, correlation):
    """Level 1 (float activations) differs only by the offsets' 8-bit digits (relative logit error 9e-3 on
    this tiny model); level 4 (int8 activations, the default) is close."""
    folder, blocks = q4_1_llama
    monkeypatch.setattr(onnx_export, "source_blocks", lambda spec, model, quantize: GgufBlocks.holding(blocks))
    monkeypatch.setattr(graph, "ACCURACY_LEVEL", level)
    manifest = onnx_export.export(str(folder), tmp_path / "out", layers_spec="1-2", quantize="int4", kernels="stock")
    assert manifest.weights.startswith("17 from the GGUF's own blocks (Q4_1, Q8_0; 1 exact, 16 offsets to 8 bits (max ")
    assert manifest.kernels == "stock"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 17 + 4 * 4 and "MatMul" not in ops  # + each Q4_1 linear's block sums
    assert ops.count("GatherBlockQuantized") == 1  # the tied embedding read from the head's Q8_0 blocks
    checks = manifest.verification
    assert checks["zero"] < tolerance and checks["steered"] < tolerance
    assert checks["steering_effect_correlation"] > correlation


@pytest.mark.usefixtures("needs_kernels")
def test_fused_export_runs_each_q4_1_linear_and_each_steering_in_one_kernel(tmp_path, monkeypatch, q4_1_llama):
    folder, blocks = q4_1_llama
    monkeypatch.setattr(onnx_export, "source_blocks", lambda spec, model, quantize: GgufBlocks.holding(blocks))
    manifest = onnx_export.export(str(folder), tmp_path / "out", layers_spec="1-2", quantize="int4")
    assert manifest.kernels == "fused"
    assert manifest.weights == "17 from the GGUF's own blocks (Q4_1, Q8_0; 17 exact)"
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("Q4_1MatMul") == 4 * 4 and ops.count("MatMulNBits") == 1  # the head; no block sums
    assert ops.count("SteeredAdd") == 2  # layers 1-2, one kernel each
    tolerance = onnx_export.QUANTIZED_TOLERANCE["int4"]
    checks = manifest.verification
    assert checks["zero"] < tolerance and checks["steered"] < tolerance
    assert checks["steering_effect_correlation"] > onnx_export.MIN_EFFECT_CORRELATION["int4"]


def test_explicit_fused_kernels_that_cannot_build_fail_clearly(tmp_path, monkeypatch, q4_1_llama):
    folder, blocks = q4_1_llama
    monkeypatch.setattr(onnx_export, "source_blocks", lambda spec, model, quantize: GgufBlocks.holding(blocks))
    monkeypatch.setattr(kernels, "header_dirs", lambda: [tmp_path])
    monkeypatch.setenv("GRAINS_EDGE_CACHE", str(tmp_path / "empty-cache"))  # no earlier build to fall back on
    with pytest.raises(GrainsError, match="no ONNX Runtime headers"):
        onnx_export.export(str(folder), tmp_path / "out", quantize="int4", kernels="fused")
    assert not (tmp_path / "out").exists()
    manifest = onnx_export.export(str(folder), tmp_path / "out", layers_spec="1-2", quantize="int4")
    assert manifest.kernels == "stock"  # auto falls back


def test_q4_1_fields_are_the_ggml_block_fields():
    weight = np.random.default_rng(4).normal(size=(3, 64)).astype(np.float32)
    raw = ggml_bytes(weight, "Q4_1").reshape(3, 2, 20)  # [rows, blocks, {d, m, 16 bytes}]
    nibbles, d, m = q4_1_fields(decode("Q4_1", raw.reshape(3, -1)))
    np.testing.assert_array_equal(nibbles, raw[..., 4:].reshape(3, 32))
    np.testing.assert_array_equal(d.view(np.uint8).reshape(3, 2, 2), raw[..., 0:2])
    np.testing.assert_array_equal(m.view(np.uint8).reshape(3, 2, 2), raw[..., 2:4])
