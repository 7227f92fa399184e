"""A GGUF model's own quantized blocks (Q4_0, Q4_1, Q8_0), repacked for ONNX Runtime's MatMulNBits without
requantizing: a second rounding of already-quantized weights costs more than it saves (the derivation, the
layouts and the measurements: docs/design-notes.md, "GGUF blocks in MatMulNBits").

Sources: ggml's block formats (ggml-common.h, `block_q4_0`, `block_q4_1`, `block_q8_0`); ONNX Runtime
contrib op docs (`com.microsoft.MatMulNBits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 32
OFFSET_DIGITS = 2  # base-16 digits per folded Q4_1 offset (8 bits)


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


def offset_columns(cols: int) -> int:
    """Extra K columns that `folded` adds to a [N, cols] weight: OFFSET_DIGITS copies of the block sums,
    each padded to whole blocks."""
    groups = -(-(cols // BLOCK) // BLOCK)  # groups of up to 32 offsets, one block each
    return OFFSET_DIGITS * groups * BLOCK


def block_sum_indicator(cols: int) -> Blocks:
    """4-bit weight [offset_columns(cols), cols] of 0s and 1s: x @ it^T = [S, 0 pad] repeated OFFSET_DIGITS
    times, S [cols/32] the block sums of x (level 9 is 1, level 8 is 0, scale 1: exact)."""
    sums, extra = cols // BLOCK, offset_columns(cols)
    copy = extra // OFFSET_DIGITS
    q = np.full((extra, cols), 8, np.uint8)
    for digit in range(OFFSET_DIGITS):
        rows = digit * copy + np.arange(sums)  # [sums]
        q.reshape(extra, sums, BLOCK)[rows, np.arange(sums)] = 9
    return Blocks(4, q, np.ones((extra, sums), np.float32))


def folded(blocks: Blocks) -> Blocks:
    """4-bit blocks with offsets -> the same weight as [N, cols + offset_columns(cols)] blocks without
    offsets, for the input [x, block_sum_indicator(cols) @ x]: the offsets as OFFSET_DIGITS signed base-16
    digits, digit i of a group scaled by u * 16^(OFFSET_DIGITS - 1 - i),
    u = max |offset| / (7 * 16^(OFFSET_DIGITS - 1))."""
    rows, cols = blocks.shape
    sums, extra = cols // BLOCK, offset_columns(cols)
    padded = np.zeros((rows, extra // OFFSET_DIGITS), np.float64)
    padded[:, :sums] = blocks.offsets
    groups = padded.reshape(rows, -1, BLOCK)  # [N, G, 32]
    unit = np.abs(groups).max(-1, keepdims=True) / (7 * 16 ** (OFFSET_DIGITS - 1))  # [N, G, 1]
    unit[unit == 0] = 1
    value = np.rint(groups / unit).astype(np.int64)  # |value| <= 7 * 16^(digits-1)
    digits = []
    for _ in range(OFFSET_DIGITS - 1):
        low = (value + 8) % 16 - 8  # in -8..7
        digits.insert(0, low)
        value = (value - low) // 16
    digits.insert(0, value)  # the top digit, in -7..7
    levels = [(digit + 8).astype(np.uint8).reshape(rows, -1) for digit in digits]
    scales = [unit[..., 0] * 16.0 ** (OFFSET_DIGITS - 1 - i) for i in range(OFFSET_DIGITS)]
    return Blocks(
        4,
        np.concatenate([blocks.q, *levels], axis=1),
        np.concatenate([blocks.scales, *scales], axis=1).astype(np.float32),
    )


def q4_1_fields(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GGUF Q4_1 fields of 4-bit blocks with offsets, as grains_edge.Q4_1MatMul takes them: nibbles
    [N, K/2] uint8 (ggml order: level j in the low nibble of byte j, level j + 16 in the high one), d and
    m [N, K/32] float16, w = d * q + m."""
    rows, cols = blocks.shape
    levels = blocks.q.reshape(rows, cols // BLOCK, BLOCK)
    nibbles = (levels[..., :16] | (levels[..., 16:] << 4)).reshape(rows, cols // 2)
    d = blocks.scales.astype(np.float16)
    m = (blocks.offsets - 8 * blocks.scales).astype(np.float16)
    exact = np.array_equal(d.astype(np.float32), blocks.scales) and np.array_equal(
        m.astype(np.float32) + 8 * d.astype(np.float32), blocks.offsets
    )
    if not exact:
        raise ValueError("these blocks are not float16 Q4_1 fields (d, m)")
    return np.ascontiguousarray(nibbles), d, m


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
