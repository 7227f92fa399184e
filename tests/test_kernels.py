"""grains-edge's own kernels. Q4_1MatMul: exactly its int8 specification (emulated in numpy, float64), on
whole and partial groups of blocks, batched rows and each instruction path (AVX-512, AVX2, plain C++).
SteeredAdd: the renormalized residual add. Clear errors when they cannot be built or get a wrong shape."""

import os

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from grains_edge import kernels, paths
from grains_edge.errors import GrainsError

needs_kernels = pytest.mark.usefixtures("needs_kernels")


def q4_1_weight(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random Q4_1 fields: nibbles [N, K/2] uint8 (ggml order), d and m [N, K/32] float16."""
    rng = np.random.default_rng(seed)
    blocks = cols // 32
    levels = rng.integers(0, 16, (rows, blocks, 32)).astype(np.uint8)
    d = (rng.random((rows, blocks)) * 0.02 + 1e-3).astype(np.float16)
    m = (-rng.random((rows, blocks)) * 0.15).astype(np.float16)
    nibbles = (levels[..., :16] | (levels[..., 16:] << 4)).reshape(rows, cols // 2)
    return nibbles, d, m


def specification(x: np.ndarray, nibbles: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """y = sum_b d dx ((q - 8) . xq) + (m + 8 d) S in float64: x rounded to int8 per block of 32 with scale
    max|x_b| / 127, S the float block sums."""
    rows, half = nibbles.shape
    packed = nibbles.reshape(rows, -1, 16)
    levels = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float64)  # [N, blocks, 32]
    d64, m64 = d.astype(np.float64), m.astype(np.float64)
    xb = x.astype(np.float64).reshape(*x.shape[:-1], -1, 32)  # [..., blocks, 32]
    amax = np.abs(xb).max(-1, keepdims=True)
    xq = np.rint(xb * np.divide(127, amax, out=np.zeros_like(amax), where=amax > 0))
    dots = np.einsum("...bj,nbj->...nb", xq, levels - 8)  # [..., N, blocks]
    return (dots * d64 * (amax / 127)[..., None, :, 0]).sum(-1) + xb.sum(-1) @ (m64 + 8 * d64).T


# the instruction paths of q4_1_matmul.cc: what -march=native gives here, AVX2 only, plain C++
PATHS = {"native": (), "avx2": ("-mno-avx512f",), "plain": ("-mno-avx2", "-mno-avx512f")}


def one_node_session(node, inputs: list[str], initializers=(), threads: int = 2, flags=()) -> ort.InferenceSession:
    """A session of one grains_edge node (float inputs, one float output), the library built with `flags`."""
    graph = helper.make_graph(
        [node],
        node.op_type,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        list(initializers),
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(kernels.DOMAIN, 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(kernels.library(flags)))
    model = helper.make_model(graph, opset_imports=opsets)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def session(rows: int, cols: int, fields, threads: int = 2, flags=()) -> ort.InferenceSession:
    names = ["q", "d", "m"]
    node = helper.make_node("Q4_1MatMul", ["x", *names], ["y"], domain=kernels.DOMAIN, K=cols, N=rows)
    weights = [numpy_helper.from_array(value, name) for name, value in zip(names, fields, strict=True)]
    return one_node_session(node, ["x"], weights, threads, flags)


@needs_kernels
@pytest.mark.parametrize(
    ("rows", "cols", "shape"),
    [
        (960, 576, (1, 1)),  # decode: 18 blocks = one group of 16 and a partial one
        (576, 1536, (2, 7)),  # 48 blocks = three whole groups; a batch of prompts
        (37, 32, (3,)),  # one block; rows not a multiple of the 4-row step or the 32-row task
        (70, 672, (1, 65)),  # 21 blocks; a long prompt
        (40, 8224, (1, 1)),  # a decode step on a long row of x (257 blocks: the next row prefetched to L2)
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_kernel_is_its_int8_specification(rows, cols, shape, path):
    fields = q4_1_weight(rows, cols, seed=rows)
    x = np.random.default_rng(cols).normal(size=(*shape, cols)).astype(np.float32)
    x[..., :32] = 0  # an all-zero block: scale 0, no division by it
    y = session(rows, cols, fields, flags=PATHS[path]).run(None, {"x": x})[0]
    expected = specification(x, *fields)
    assert y.shape == (*shape, rows)
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-6 * np.abs(expected).max())


@needs_kernels
def test_kernel_is_close_to_the_float_product_and_the_same_on_one_thread():
    rows, cols = 256, 576
    fields = q4_1_weight(rows, cols, seed=5)
    nibbles, d, m = fields
    packed = nibbles.reshape(rows, -1, 16)
    levels = np.concatenate([packed & 15, packed >> 4], axis=-1)
    weight = (levels * d[..., None].astype(np.float32) + m[..., None].astype(np.float32)).reshape(rows, cols)
    x = np.random.default_rng(6).normal(size=(4, cols)).astype(np.float32)
    y = session(rows, cols, fields).run(None, {"x": x})[0]
    exact = x @ weight.T
    assert np.abs(y - exact).max() < 0.01 * np.abs(exact).max()  # int8 activations: well under 1 %
    np.testing.assert_array_equal(session(rows, cols, fields, threads=1).run(None, {"x": x})[0], y)


def steered_add_session() -> ort.InferenceSession:
    node = helper.make_node("SteeredAdd", ["h", "delta", "shift"], ["out"], domain=kernels.DOMAIN, epsilon=1e-12)
    return one_node_session(node, ["h", "delta", "shift"])


@needs_kernels
@pytest.mark.parametrize("seq", [1, 37])  # a decode step, and a prompt spread over threads
def test_steered_add_keeps_each_tokens_norm(seq):
    rng = np.random.default_rng(seq)
    h, delta = rng.normal(size=(2, 2, seq, 64)).astype(np.float32)
    shift = (rng.normal(size=(2, 1, 64)) * [[[3.0]], [[0.0]]]).astype(np.float32)  # the second row unsteered
    out = steered_add_session().run(None, {"h": h, "delta": delta, "shift": shift})[0]
    y = h + delta
    expected = (
        (y + shift) * np.linalg.norm(y, axis=-1, keepdims=True) / np.linalg.norm(y + shift, axis=-1, keepdims=True)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(y, axis=-1), rtol=1e-5)


@needs_kernels
def test_kernel_names_a_wrong_input_shape():
    fields = q4_1_weight(8, 64, seed=1)
    with pytest.raises(Exception, match="x's last axis must be K"):
        session(8, 64, fields).run(None, {"x": np.zeros((1, 63), np.float32)})
    h = np.zeros((1, 2, 8), np.float32)
    with pytest.raises(Exception, match="shift \\[b, 1, hidden\\]"):
        steered_add_session().run(None, {"h": h, "delta": h, "shift": np.zeros((1, 2, 8), np.float32)})


def test_unavailable_kernels_say_why_and_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAINS_EDGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert "no C++ compiler" in kernels.unavailable_reason()
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(kernels, "header_dirs", lambda: [tmp_path])
    reason = kernels.unavailable_reason()
    assert "no ONNX Runtime headers" in reason and "GRAINS_EDGE_ORT_INCLUDE" in reason
    with pytest.raises(GrainsError):
        kernels.library()


@needs_kernels
def test_a_broken_build_leaves_no_library(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCES", [broken])
    with pytest.raises(kernels.KernelsUnavailable, match="did not compile"):
        kernels.library()
    assert not list(paths.cache_dir().rglob("*partial*"))


@needs_kernels
def test_a_machine_that_lost_its_compiler_and_headers_keeps_its_build(monkeypatch, tmp_path):
    built = kernels.library()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "header_dirs", lambda: [tmp_path])
    assert kernels.library() == built
    monkeypatch.setattr(kernels, "FLAGS", [*kernels.FLAGS, "-DANOTHER_BUILD"])
    with pytest.raises(kernels.KernelsUnavailable, match="no C\\+\\+ compiler"):
        kernels.library()


def test_kernels_build_in_ci():
    """CI fetches the headers (make): the fused path must be what the suite tests there."""
    if not os.environ.get("CI"):
        pytest.skip("only CI promises the headers")
    assert kernels.unavailable_reason() is None
