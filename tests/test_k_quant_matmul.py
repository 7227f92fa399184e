"""Q4_0MatMul, Q4_KMatMul, Q5_KMatMul, Q6_KMatMul and their Gathers (grains_edge/kernels/k_quant_matmul.cc) on a
GGUF's bytes: each product is its int8 specification (emulated in numpy, float64, from gguf_blocks' decoders) on every
instruction path, single rows, batches and prompts; the gathered rows are gguf-py's dequantization, bit for bit."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from onnx import helper, numpy_helper

from grains_edge import kernels
from grains_edge.export.gguf_blocks import decode
from tests.test_gguf_k_quants import random_blocks
from tests.test_kernels import PATHS, one_node_session

pytestmark = pytest.mark.usefixtures("needs_kernels")
BYTES = {"Q4_0": 144, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # per 256 weights


def specification(kind: str, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """x rounded to int8 per block of 32 (xq, scale dx = max|x_b| / 127, float sums S_b), in float64:
    Q4_0  y = sum_j d_j dx_j ((q_j - 8) . xq_j)                                over its blocks of 32;
    Q4_K  y = sum_j d sc_j dx_j ((q_j - 8) . xq_j) + (8 d sc_j - dmin m_j) S_j  over its sub-blocks of 32;
    Q5_K  the same with 5-bit levels centred on 16;
    Q6_K  y = sum_j d sc_j dx_b(j) ((q_j - 32) . xq_j)                        over its sub-blocks of 16."""
    blocks = decode(kind, raw)  # levels q (Q5_K: q + 112, Q6_K: q + 96) and scales per (sub-)block; offsets
    rows, cols = blocks.shape
    size = blocks.block_size
    xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, 32)  # [..., blocks, 32]
    amax = np.abs(xb).max(-1, keepdims=True)
    xq = np.rint(xb * np.divide(127, amax, out=np.zeros_like(amax), where=amax > 0))
    dx = np.repeat(amax[..., 0] / 127, 32 // size, axis=-1)  # [..., sub-blocks]
    levels = blocks.q.reshape(rows, cols // size, size).astype(np.float64)
    levels -= blocks.zero_point  # Q4_0, Q4_K: q - 8; Q5_K: q - 16; Q6_K: q - 32
    dots = np.einsum("...jk,njk->...nj", xq.reshape(*x.shape[:-1], -1, size), levels)  # [..., N, sub-blocks]
    y = (dots * blocks.scales.astype(np.float64) * dx[..., None, :]).sum(-1)
    if blocks.offsets is not None:
        y += xb.sum(-1) @ blocks.offsets.T  # offsets: 8 d sc_j - dmin m_j (Q5_K: 16 d sc_j - dmin m_j)
    return y


def matmul_session(kind: str, raw: np.ndarray, flags=()):
    rows, cols = raw.shape[0], raw.shape[1] // BYTES[kind] * 256
    node = helper.make_node(f"{kind}MatMul", ["x", "w"], ["y"], domain=kernels.DOMAIN, K=cols, N=rows)
    return one_node_session(node, ["x"], [numpy_helper.from_array(raw, "w")], flags=flags)


@pytest.mark.parametrize(
    ("rows", "cols", "shape"),
    [
        (64, 512, (1, 1)),  # decode
        (37, 256, (2, 5)),  # one super-block; rows not a multiple of the 4-row step; 10 rows of x
        (70, 768, (1, 9)),  # a prompt: two 4-row passes of x and one row
        (40, 8448, (1, 1)),  # a decode step on a long row of x (33 super-blocks: the next row prefetched to L2)
    ],
)
@pytest.mark.parametrize("path", ["native", "plain"])  # no AVX2-only path: it takes the plain one
@pytest.mark.parametrize("kind", list(BYTES))
def test_product_is_its_int8_specification(kind, rows, cols, shape, path):
    raw = random_blocks(kind, rows, cols, size=0.05, seed=rows)
    x = np.random.default_rng(cols).normal(size=(*shape, cols)).astype(np.float32)
    x[..., 32:64] = 0  # an all-zero block: scale 0, no division by it
    x[..., 7] = 40.0  # an outlier: its block of 32 alone gets the coarse scale
    y = matmul_session(kind, raw, PATHS[path]).run(None, {"x": x})[0]
    expected = specification(kind, x, raw)
    assert y.shape == (*shape, rows)
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@pytest.mark.parametrize("kind", list(BYTES))
def test_product_is_close_to_the_float_product(kind):
    raw = random_blocks(kind, 96, 1024, size=0.05, seed=3)
    x = np.random.default_rng(4).normal(size=(3, 1024)).astype(np.float32)
    exact = x @ quants.dequantize(raw, GGMLQuantizationType[kind]).T
    y = matmul_session(kind, raw).run(None, {"x": x})[0]
    assert np.abs(y - exact).max() < 0.01 * np.abs(exact).max()  # int8 activations: well under 1 %


@pytest.mark.parametrize("kind", list(BYTES))
def test_gathered_rows_are_gguf_s_dequantization_bit_for_bit(kind):
    raw = random_blocks(kind, 50, 512, size=2.0, seed=5)
    ids = np.array([[3, 0, 49], [3, 7, 12]], np.int64)
    node = helper.make_node(f"{kind}Gather", ["w", "ids"], ["rows"], domain=kernels.DOMAIN, K=512, N=50)
    session = one_node_session(node, [], [numpy_helper.from_array(raw, "w"), numpy_helper.from_array(ids, "ids")])
    rows = session.run(None, {})[0]
    reference = quants.dequantize(raw, GGMLQuantizationType[kind])[ids]  # [2, 3, 512]
    np.testing.assert_array_equal(rows.view(np.uint32), reference.view(np.uint32))


def test_wrong_shapes_and_ids_are_named():
    raw = random_blocks("Q6_K", 8, 256, size=1.0, seed=6)
    with pytest.raises(Exception, match="x's last axis must be K"):
        matmul_session("Q6_K", raw).run(None, {"x": np.zeros((1, 255), np.float32)})
    node = helper.make_node("Q6_KGather", ["w", "ids"], ["rows"], domain=kernels.DOMAIN, K=256, N=8)
    ids = numpy_helper.from_array(np.array([8], np.int64), "ids")
    with pytest.raises(Exception, match="an id is outside the table"):
        one_node_session(node, [], [numpy_helper.from_array(raw, "w"), ids]).run(None, {})
