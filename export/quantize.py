"""Float weights to quantized blocks, for `--quantize int4` of a model that is not already quantized (a
safetensors folder, a Hub id, the tensors of a GGUF that are not in a block format the export carries over).

Every quantizer takes one weight [N, K] (rows of a linear, K its input size, a multiple of 32) and returns
`gguf_blocks.Blocks` of 32 weights along K, so each runs in the same graph as a GGUF's own blocks: blocks
with offsets in grains-edge's Q4_1 kernel (float16 d and m, w = d·q + m), symmetric ones in stock
MatMulNBits. The export's choice, measured on Dolly perplexity and TruthfulQA (docs/design-notes.md,
"int4 from float weights"): `q4_1_search` for every linear but the LM head, which keeps 8 bits
(`q8_symmetric`, as a Q8_0 head of a Q4_K_M GGUF does). The others are kept for that measurement
(bench/bench_quant.py).

Sources: llama.cpp's make_qkx2_quants (ggml-quants.c, the min/scale search of its K-quants) and
quantize_row_q4_1_ref (Q4_1's min/max rounding); ONNX Runtime's MatMulNBits quantizers
(onnxruntime/quantization/matmul_nbits_quantizer.py: quantize_matmul_4bits, HQQWeightOnlyQuantizer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from grains_edge.export.gguf_blocks import BLOCK, Blocks

LEVELS = 15  # the largest 4-bit level
# make_qkx2_quants' grid for Q4_K: 1/scale tried at (15 + SEARCH_START + SEARCH_STEP * i) / (max - min)
SEARCH_START, SEARCH_STEP, SEARCH_STEPS = -1.0, 0.1, 20
CHUNK_BLOCKS = 1 << 16  # blocks searched at once: bounds the search's temporaries to a few tens of MB

Quantizer = Callable[[np.ndarray], Blocks]


def blocks_of(weight: np.ndarray) -> np.ndarray:
    """[N, K] -> [N * K/32, 32] float64: one row per block of 32 along K."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"a weight quantized in blocks of {BLOCK} needs K a multiple of {BLOCK}, not {cols}")
    return weight.astype(np.float32).reshape(rows * cols // BLOCK, BLOCK)


def q4_1_blocks(levels: np.ndarray, d: np.ndarray, m: np.ndarray, rows: int) -> Blocks:
    """Q4_1 fields per block (levels [B, 32] in 0..15, d and m [B] float16; w = d·q + m) as Blocks of a
    [rows, B * 32 / rows] weight: scales d, offsets m + 8d (exact in float64)."""
    d64, m64 = d.astype(np.float64), m.astype(np.float64)
    return Blocks(
        4,
        levels.astype(np.uint8).reshape(rows, -1),
        d.astype(np.float32).reshape(rows, -1),
        (m64 + 8.0 * d64).reshape(rows, -1),
    )


def levels_for(x: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The nearest level in 0..15 of each weight x [B, 32] for block fields d, m [B]; level 0 where d is 0."""
    step = np.where(d == 0, 1.0, d)[:, None]
    return np.clip(np.rint((x - m[:, None]) / step), 0, LEVELS) * (d != 0)[:, None]


def rounded_fields(x: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels [B, 32], d [B] float16, m [B] float16): the fields rounded to float16 as stored, then the
    levels nearest to x for those stored fields."""
    d16, m16 = d.astype(np.float16), m.astype(np.float16)
    return levels_for(x, d16.astype(np.float64), m16.astype(np.float64)), d16, m16


def block_error(x: np.ndarray, weights: np.ndarray, levels: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Weighted squared error per block [B] of d·levels + m against x [B, 32]."""
    approx = levels * d.astype(np.float64)[:, None] + m.astype(np.float64)[:, None]
    return (weights * (approx - x) ** 2).sum(-1)


def q4_1_min_max(weight: np.ndarray) -> Blocks:
    """Q4_1 by each block's min and max (llama.cpp's quantize_row_q4_1_ref): d = (max - min)/15, m = min."""
    x = blocks_of(weight)  # [B, 32]
    low, high = x.min(-1), x.max(-1)
    return q4_1_blocks(*rounded_fields(x, (high - low) / LEVELS, low), weight.shape[0])


def importance(x: np.ndarray) -> np.ndarray:
    """make_qkx2_quants' weights without an importance matrix (llama.cpp's Q4_K): each block's RMS plus
    |x|, so the large weights of a block, which move a dot product most, are matched more closely."""
    return np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)  # [B, 32]


def search_chunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The search of `q4_1_search` on blocks x [B, 32] -> (levels [B, 32], d [B] float16, m [B] float16)."""
    weights = importance(x)
    weighted_x = weights * x
    low, high = x.min(-1), x.max(-1)
    unit = (x - low[:, None]) / np.where(high > low, high - low, 1.0)[:, None]  # [B, 32] in 0..1
    row_sum = lambda a, b: np.einsum("ij,ij->i", a, b).astype(np.float64)  # noqa: E731
    sum_w, sum_wx, sum_wxx = weights.sum(-1).astype(np.float64), row_sum(weights, x), row_sum(weighted_x, x)
    mean = np.divide(sum_wx, sum_w, out=np.zeros_like(sum_w), where=sum_w > 0)  # m of a one-level block
    best_error = np.full(len(x), np.inf)
    best_d, best_m = np.zeros(len(x)), np.zeros(len(x))
    levels, squares = np.empty_like(x), np.empty_like(x)
    for step in range(SEARCH_STEPS + 1):
        np.multiply(unit, LEVELS + SEARCH_START + SEARCH_STEP * step, out=levels)  # 1/d on make_qkx2's grid
        np.clip(np.rint(levels, out=levels), 0, LEVELS, out=levels)
        # weighted least squares of x ≈ d·levels + m over each block, and its error, from the sums
        sum_wl, sum_wlx = row_sum(weights, levels), row_sum(weighted_x, levels)
        sum_wll = row_sum(weights, np.multiply(levels, levels, out=squares))
        det = sum_w * sum_wll - sum_wl * sum_wl
        fit = det > 1e-9 * sum_w * sum_wll
        safe = np.where(fit, det, 1.0)
        d = np.where(fit, (sum_w * sum_wlx - sum_wx * sum_wl) / safe, 0.0)
        m = np.where(fit, (sum_wll * sum_wx - sum_wl * sum_wlx) / safe, mean)
        error = d * d * sum_wll + 2 * d * m * sum_wl + m * m * sum_w - 2 * d * sum_wlx - 2 * m * sum_wx + sum_wxx
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
    found = rounded_fields(x, best_d, best_m)
    min_max = rounded_fields(x, (high - low) / LEVELS, low)
    keep = block_error(x, weights, *found) <= block_error(x, weights, *min_max)  # float16 can tip the balance
    return tuple(np.where(keep[:, None] if a.ndim == 2 else keep, a, b) for a, b in zip(found, min_max, strict=True))


def q4_1_search(weight: np.ndarray) -> Blocks:
    """Q4_1 with each block's d and m searched, after llama.cpp's make_qkx2_quants for Q4_K: 1/d tried on a
    grid around 15/(max - min), the levels rounded for each try, d and m refit to them by weighted least
    squares (weights `importance`), and the try with the least weighted error kept, the min/max rounding
    among the tries. Unlike Q4_K's, m may be positive. Errors are those of the float16 fields as stored, so
    each block's is at most its `q4_1_min_max` error."""
    x = blocks_of(weight)  # [B, 32]
    parts = [search_chunk(x[start : start + CHUNK_BLOCKS]) for start in range(0, len(x), CHUNK_BLOCKS)]
    levels, d, m = (np.concatenate(field) for field in zip(*parts, strict=True))
    return q4_1_blocks(levels, d, m, weight.shape[0])


def q8_symmetric(weight: np.ndarray) -> Blocks:
    """8-bit blocks as Q8_0: d = max |x| / 127, q = round(x / d) (d kept in float32, as MatMulNBits takes it)."""
    x = blocks_of(weight)  # [B, 32]
    d = np.abs(x).max(-1) / 127
    q = np.rint(x / np.where(d == 0, 1.0, d)[:, None]) + 128
    rows = weight.shape[0]
    return Blocks(8, q.astype(np.uint8).reshape(rows, -1), d.astype(np.float32).reshape(rows, -1))


def ort_rtn(weight: np.ndarray, symmetric: bool) -> Blocks:
    """ONNX Runtime's round-to-nearest (its C++ quantize_matmul_4bits, what MatMulNBitsQuantizer runs):
    symmetric w = s·(q - 8), or w = s·(q - z) with an integer zero point z per block, as offsets s·(8 - z)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rows, cols = weight.shape
    count = cols // BLOCK
    packed = np.zeros((rows, count, BLOCK // 2), np.uint8)
    zero_points = np.zeros((rows, (count + 1) // 2), np.uint8)
    scales = np.zeros((rows, count), np.float32)
    transposed = np.ascontiguousarray(weight.T, np.float32)  # [K, N], as a MatMul initializer
    quantize_matmul_4bits(packed, transposed, scales, zero_points, BLOCK, rows, cols, symmetric)
    levels = np.stack([packed & 15, packed >> 4], axis=-1).reshape(rows, cols)  # elements 2j, 2j + 1 of byte j
    if symmetric:
        return Blocks(4, levels, scales)
    zero = np.stack([zero_points & 15, zero_points >> 4], axis=-1).reshape(rows, -1)[:, :count]
    return Blocks(4, levels, scales, scales.astype(np.float64) * (8.0 - zero))


def ort_hqq(weight: np.ndarray) -> Blocks:
    """ONNX Runtime's HQQ (half-quadratic: a float zero point per block refined by a proximal solver of an
    l_0.7 error, scales from min/max): w = s·(q - z), as offsets s·(8 - z)."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4))
    levels, scales, zero = quantizer.quantize_internal(
        torch.from_numpy(np.ascontiguousarray(weight, np.float32)), bits=4, group_size=BLOCK
    )
    scales64 = scales.numpy().astype(np.float64)  # [N, K/32]
    return Blocks(4, levels.numpy().astype(np.uint8), scales.numpy(), scales64 * (8.0 - zero.numpy()))


# name -> quantizer of the layers' linears, for the measurement (bench/bench_quant.py)
LINEAR_QUANTIZERS: dict[str, Quantizer] = {
    "q4_1-search": q4_1_search,
    "q4_1-min-max": q4_1_min_max,
    "ort-rtn-symmetric": lambda weight: ort_rtn(weight, symmetric=True),
    "ort-rtn-asymmetric": lambda weight: ort_rtn(weight, symmetric=False),
    "ort-hqq": ort_hqq,
}
LINEAR = "q4_1-search"  # the export's choice
HEAD = q8_symmetric  # the LM head's: 4 bits there cost most of int4's error (docs/design-notes.md)


def graph_weights(proto: onnx.ModelProto) -> Iterator[tuple[str, np.ndarray]]:
    """The float MatMul weights of a graph from graph.py, one at a time: (linear name, [N, K]) from the
    initializer `{name}.weight` [K, N]."""
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            yield node.input[1].removesuffix(".weight"), numpy_helper.to_array(initializers[node.input[1]]).T


def int4_block(name: str, weight: np.ndarray) -> Blocks | None:
    """Blocks for the float weight [N, K] of linear `name` of a graph from graph.py (graph.Quantizer), None
    where K is not a multiple of 32: the LM head ("lm_head") by HEAD, every other linear by
    LINEAR_QUANTIZERS[LINEAR]."""
    if weight.shape[1] % BLOCK:
        return None
    return (HEAD if name == "lm_head" else LINEAR_QUANTIZERS[LINEAR])(weight)


def kind(blocks: Blocks) -> str:
    return f"{blocks.bits}-bit" + (" Q4_1" if blocks.offsets is not None else "")


def summary(kinds: list[str]) -> str:
    """How `int4_block` stored the weights (their `kind`s), for the export's log and manifest."""
    counted = ", ".join(f"{kinds.count(each)} {each}" for each in sorted(set(kinds)))
    return f"{len(kinds)} quantized from float ({LINEAR}: {counted})"
