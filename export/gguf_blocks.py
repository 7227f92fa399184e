"""A GGUF model's own quantized blocks, repacked for ONNX Runtime's MatMulNBits without requantizing.

Requantizing already-quantized weights adds a second rounding on top of the first (on SmolLM2-135M
Q4_1, round-to-nearest symmetric int4 of the dequantized weights kept the argmax token only 30 % of the
time). When the source is a GGUF, the blocks are carried over exactly instead:

    Q8_0  w = d * q               q int8          -> 8 bits, q + 128
    Q4_0  w = d * (q - 8)         q in 0..15      -> 4 bits, q
    Q4_1  w = d * q + m           q in 0..15      -> 4 bits, q, plus the block offset m + 8d

all with MatMulNBits' default zero point (2^(bits-1): 128, 8), given as no zero_points input at all:
its kernels without zero points are faster (about 5 % of an int4 decode step on SmolLM2-135M). A
float zero point (-m/d) would be exact but ONNX Runtime 1.32 then falls back to a kernel ~40x slower
(measured on a 576x1536 weight: 1.7 ms vs 45 us), and refitting Q4_1 blocks to integer zero points
(least squares per block) raised Dolly perplexity by 14 %. So Q4_1's offset is applied separately and
exactly:

    x @ w[n]^T = sum_b d[n,b] * (x_b . (q[n,b] - 8)) + sum_b (m[n,b] + 8 d[n,b]) * sum(x_b)

the second term being the block sums of x [.., K/32] times the offsets^T [K/32, N], a 1/32-size float
MatMul.

Layouts. GGUF stores a weight [N, K] row-major as blocks of 32 along K; a Q4 block keeps element j in
the low nibble of byte j and element j + 16 in the high nibble; MatMulNBits wants B [N, K/32, 16]
with elements 2j and 2j + 1 in the low and high nibbles of byte j, and scales [N * K/32]. llama.cpp
stores q and k rows permuted for its RoPE layout; they are permuted back as transformers does
(`_reverse_permute_weights`).

Sources: ggml's block formats (ggml-common.h, `block_q4_0`, `block_q4_1`, `block_q8_0`); ONNX Runtime
contrib op docs (`com.microsoft.MatMulNBits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 32


@dataclass
class Blocks:
    """One weight [N, K] in MatMulNBits form: w[n, k] = scales[n, b] * (q[n, k] - 2^(bits-1)) + offsets[n, b]."""

    bits: int
    q: np.ndarray  # [N, K] uint8, unpacked levels
    scales: np.ndarray  # [N, K/32] float32
    offsets: np.ndarray | None = None  # [N, K/32] float32 (Q4_1's minimum + 8 d), None when 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def packed(self) -> np.ndarray:
        """B input [N, K/32, 32 * bits / 8] uint8."""
        rows, cols = self.q.shape
        blocks = self.q.reshape(rows, cols // BLOCK, BLOCK)
        if self.bits == 8:
            return np.ascontiguousarray(blocks)
        return np.ascontiguousarray(blocks[..., 0::2] | (blocks[..., 1::2] << 4))

    def dequantized(self) -> np.ndarray:
        """[N, K] float32, the weight these blocks represent."""
        rows, cols = self.q.shape
        levels = self.q.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32) - (1 << (self.bits - 1))
        weight = levels * self.scales[..., None]
        if self.offsets is not None:
            weight = weight + self.offsets[..., None]
        return weight.reshape(rows, cols)


def halves(raw: np.ndarray, start: int) -> np.ndarray:
    """float16 field at byte `start` of each block [..., bytes] -> float32 [...]."""
    return np.ascontiguousarray(raw[..., start : start + 2]).view(np.float16)[..., 0].astype(np.float32)


def nibbles(raw: np.ndarray) -> np.ndarray:
    """The 32 levels of each ggml Q4 block from its 16 bytes [..., 16] -> [..., 32]."""
    return np.concatenate([raw & 15, raw >> 4], axis=-1)


def decode(kind: str, data: np.ndarray) -> Blocks | None:
    """Blocks of a GGUF tensor (data [N, bytes per row] uint8), or None for other types."""
    rows = data.shape[0]
    if kind == "Q8_0":  # f16 d, 32 x int8
        raw = data.reshape(rows, -1, 34)
        q = (raw[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(8, q.reshape(rows, -1), halves(raw, 0))
    if kind == "Q4_0":  # f16 d, 16 bytes of nibbles
        raw = data.reshape(rows, -1, 18)
        return Blocks(4, nibbles(raw[..., 2:]).reshape(rows, -1), halves(raw, 0))
    if kind == "Q4_1":  # f16 d, f16 m, 16 bytes of nibbles
        raw = data.reshape(rows, -1, 20)
        scales = halves(raw, 0)
        return Blocks(4, nibbles(raw[..., 4:]).reshape(rows, -1), scales, halves(raw, 2) + 8 * scales)
    return None


def unpermute_rows(blocks: Blocks, heads: int) -> Blocks:
    """Undo llama.cpp's q/k row permutation (rows [heads, 2, half] stored as [heads, half, 2])."""
    rows = np.arange(blocks.shape[0])
    order = rows.reshape(heads, rows.size // heads // 2, 2).swapaxes(2, 1).reshape(-1)
    pick = lambda a: None if a is None else a[order]  # noqa: E731
    return Blocks(blocks.bits, blocks.q[order], blocks.scales[order], pick(blocks.offsets))


def stacked(parts: list[Blocks]) -> Blocks | None:
    """Row-wise concatenation of weights with one format (a fused q|k|v or gate|up), else None."""
    if len({(p.bits, p.offsets is None) for p in parts}) != 1:
        return None
    offsets = None if parts[0].offsets is None else np.concatenate([p.offsets for p in parts])
    return Blocks(
        parts[0].bits,
        np.concatenate([p.q for p in parts]),
        np.concatenate([p.scales for p in parts]),
        offsets,
    )


def llama_blocks(path: str | Path, num_layers: int, heads: int, kv_heads: int) -> dict[str, Blocks]:
    """The graph's weights (graph.py names: layers.{i}.qkv|o_proj|gate_up|down_proj, lm_head) that the
    GGUF at `path` stores in a supported block format; others are absent and left to the quantizer."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def get(name: str) -> Blocks | None:
        tensor = tensors.get(name)
        return None if tensor is None else decode(tensor.tensor_type.name, np.asarray(tensor.data))

    found: dict[str, Blocks | None] = {"lm_head": get("output.weight") or get("token_embd.weight")}
    for i in range(num_layers):
        q, k, v = (get(f"blk.{i}.attn_{name}.weight") for name in ("q", "k", "v"))
        if q and k and v:
            found[f"layers.{i}.qkv"] = stacked([unpermute_rows(q, heads), unpermute_rows(k, kv_heads), v])
        found[f"layers.{i}.o_proj"] = get(f"blk.{i}.attn_output.weight")
        gate, up = get(f"blk.{i}.ffn_gate.weight"), get(f"blk.{i}.ffn_up.weight")
        if gate and up:
            found[f"layers.{i}.gate_up"] = stacked([gate, up])
        found[f"layers.{i}.down_proj"] = get(f"blk.{i}.ffn_down.weight")
    return {name: blocks for name, blocks in found.items() if blocks is not None}
