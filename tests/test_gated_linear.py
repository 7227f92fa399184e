"""Gated linears (grains_edge/kernels/gated_linear.h): a linear kernel with the `activation` attribute over W = gate |
up gives act(x @ gate^T) * (x @ up^T), the activation computed in numpy (float64, GELU by its tanh formula) from the
same kernel's plain output: on every instruction path, for Q4_1MatMul and the GGUF-block kernels, single rows,
batches and prompts, and a number of gate columns that leaves a task partial."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from grains_edge import kernels
from tests.test_gguf_k_quants import random_blocks
from tests.test_k_quant_matmul import BYTES
from tests.test_kernels import PATHS, one_node_session, q4_1_weight

pytestmark = pytest.mark.usefixtures("needs_kernels")
SHAPES = [(1, 1), (8,), (1, 37)]  # a decode step, a server's batch, a prompt


def activated(activation: str, gate: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    if activation == "silu":
        return g / (1 + np.exp(-g))
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))


def linear_session(op: str, weights: dict[str, np.ndarray], cols: int, rows: int, flags, **gated):
    node = helper.make_node(op, ["x", *weights], ["y"], domain=kernels.DOMAIN, K=cols, N=rows, **gated)
    initializers = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    return one_node_session(node, ["x"], initializers, flags=flags)


def check_gated(op: str, weights: dict[str, np.ndarray], cols: int, rows: int, flags, activation: str) -> None:
    for shape in SHAPES:
        x = np.random.default_rng(cols).normal(size=(*shape, cols)).astype(np.float32)
        plain = linear_session(op, weights, cols, rows, flags).run(None, {"x": x})[0]
        gated = linear_session(op, weights, cols, rows, flags, activation=activation).run(None, {"x": x})[0]
        expected = activated(activation, plain[..., : rows // 2]) * plain[..., rows // 2 :]
        assert gated.shape == (*shape, rows // 2)
        np.testing.assert_allclose(gated, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("path", PATHS)
def test_q4_1_gated_is_the_activation_of_its_plain_product(path, activation):
    rows, cols = 2 * 70, 576  # 70 gate columns: two whole tasks of 32 and a partial one
    weights = dict(zip("qdm", q4_1_weight(rows, cols, seed=1), strict=True))
    check_gated("Q4_1MatMul", weights, cols, rows, PATHS[path], activation)


@pytest.mark.parametrize("path", ["native", "plain"])
@pytest.mark.parametrize(
    ("kind", "activation"), [("Q4_0", "silu"), ("Q4_K", "silu"), ("Q5_K", "gelu_tanh"), ("Q6_K", "gelu_tanh")]
)
def test_gguf_block_gated_is_the_activation_of_its_plain_product(kind, activation, path):
    rows, cols = 2 * 40, 512
    raw = random_blocks(kind, rows, cols, size=0.05, seed=2)
    assert raw.shape[1] == cols // 256 * BYTES[kind]
    check_gated(f"{kind}MatMul", {"w": raw}, cols, rows, PATHS[path], activation)


def test_an_unknown_activation_or_an_odd_n_is_named():
    weights = dict(zip("qdm", q4_1_weight(33, 64, seed=3), strict=True))
    with pytest.raises(Exception, match="activation must be silu or gelu_tanh"):
        linear_session("Q4_1MatMul", weights, 64, 33, (), activation="relu")
    with pytest.raises(Exception, match="a gated N must be even"):
        linear_session("Q4_1MatMul", weights, 64, 33, (), activation="silu")
