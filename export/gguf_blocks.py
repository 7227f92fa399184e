"""A GGUF model's own quantized blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K, Q5_K, Q6_K),
repacked for ONNX Runtime's MatMulNBits or grains-edge's Q4_1 kernel without requantizing: a second rounding
of already-quantized weights costs more than it saves (the derivation, the layouts and the measurements:
docs/design-notes.md, "GGUF blocks in MatMulNBits").

Sources: ggml's block formats (ggml-common.h, `block_q4_0` … `block_q8_0`, `block_q4_K`, `block_q5_K`,
`block_q6_K`) and reference dequantizers (ggml-quants.c, `dequantize_row_*`, `get_scale_min_k4`); ONNX
Runtime contrib op docs (`com.microsoft.MatMulNBits`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 32  # weights per block of the ggml formats, and per Q4_K / Q5_K sub-block
OFFSET_DIGITS = 2  # digits in base 2^bits per folded offset: 8 bits for 4-bit blocks, 16 for 8-bit ones
# Families whose GGUF linears map onto graph.py's, and whether llama.cpp permuted their q/k rows for its
# rope (convert_hf_to_gguf.py does for Llama, not for Gemma-3; transformers undoes only the former).
PERMUTED_QK = {"llama": True, "gemma3_text": False}


@dataclass
class Blocks:
    """One weight [N, K] in MatMulNBits form: w[n, k] = scales[n, b] * (q[n, k] - 2^(bits-1)) + offsets[n, b],
    b = k // block_size."""

    bits: int
    q: np.ndarray  # [N, K] uint8, unpacked levels
    scales: np.ndarray  # [N, K/block_size] float32
    offsets: np.ndarray | None = None  # [N, K/block_size] float64, exact sums of the GGUF's fields; None when 0
    block_size: int = BLOCK
    kinds: tuple[str, ...] = ()  # the GGUF types it was read from
    raw: np.ndarray | None = None  # [N, bytes per row] uint8, the GGUF's own bytes of a RAW_KINDS weight
    parts: tuple[Blocks, ...] = ()  # a stack of several formats: its parts as they were read (`kernel_runs`)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def packed(self) -> np.ndarray:
        """B input [N, K/block_size, block_size * bits / 8] uint8."""
        rows, cols = self.q.shape
        blocks = self.q.reshape(rows, cols // self.block_size, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(blocks)
        return np.ascontiguousarray(blocks[..., 0::2] | (blocks[..., 1::2] << 4))

    def dequantized(self) -> np.ndarray:
        """[N, K] float32, the weight these blocks represent (offsets added in float64, then rounded once:
        bit-identical to ggml's float32 dequantization)."""
        rows, cols = self.q.shape
        levels = self.q.reshape(rows, cols // self.block_size, self.block_size).astype(np.float32) - self.zero_point
        weight = levels * self.scales[..., None]
        if self.offsets is not None:
            weight = (weight.astype(np.float64) + self.offsets[..., None]).astype(np.float32)
        return weight.reshape(rows, cols)


# --- decoders: raw [N, blocks, bytes per block] uint8 -> Blocks ---------------------------------------


def halves(raw: np.ndarray, start: int) -> np.ndarray:
    """float16 field at byte `start` of each block [..., bytes] -> float32 [...]."""
    return np.ascontiguousarray(raw[..., start : start + 2]).view(np.float16)[..., 0].astype(np.float32)


def nibbles(raw: np.ndarray) -> np.ndarray:
    """ggml's 4-bit order, bytes [..., n] -> levels [..., 2n]: the low nibbles, then the high ones."""
    return np.concatenate([raw & 15, raw >> 4], axis=-1)


def bits_of(raw: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> their bits [..., 8n], least significant first (bit j of a little-endian word)."""
    return np.unpackbits(np.ascontiguousarray(raw), axis=-1, bitorder="little")


def by_row(values: np.ndarray) -> np.ndarray:
    """[N, ...] -> [N, everything else]."""
    return values.reshape(values.shape[0], -1)


def q8_0(raw: np.ndarray) -> Blocks:
    """34 bytes: f16 d, 32 int8 q; w = d * q -> 8 bits, q + 128."""
    q = raw[..., 2:].view(np.int8).astype(np.int16) + 128
    return Blocks(8, by_row(q.astype(np.uint8)), halves(raw, 0))


def q4_0(raw: np.ndarray) -> Blocks:
    """18 bytes: f16 d, 16 bytes of nibbles; w = d * (q - 8) -> 4 bits, q."""
    return Blocks(4, by_row(nibbles(raw[..., 2:])), halves(raw, 0))


def q4_1(raw: np.ndarray) -> Blocks:
    """20 bytes: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m -> 4 bits, q, offset m + 8d."""
    d = halves(raw, 0)
    return Blocks(4, by_row(nibbles(raw[..., 4:])), d, halves(raw, 2) + 8.0 * d.astype(np.float64))


def five_bit_levels(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Q5 levels from 4 bytes of high bits (bit j for element j) and 16 bytes of nibbles, as 8-bit levels
    centred on 16: q + 112, so that w = d * (q - 16) is MatMulNBits' d * (level - 128)."""
    return (nibbles(low) | (bits_of(high) << 4)) + 112


def q5_0(raw: np.ndarray) -> Blocks:
    """22 bytes: f16 d, 4 bytes of high bits, 16 bytes of nibbles; w = d * (q - 16) -> 8 bits, q + 112."""
    return Blocks(8, by_row(five_bit_levels(raw[..., 2:6], raw[..., 6:])), halves(raw, 0))


def q5_1(raw: np.ndarray) -> Blocks:
    """24 bytes: f16 d, f16 m, high bits, nibbles; w = d * q + m -> 8 bits, q + 112, offset m + 16d."""
    d = halves(raw, 0)
    levels = five_bit_levels(raw[..., 4:8], raw[..., 8:])
    return Blocks(8, by_row(levels), d, halves(raw, 2) + 16.0 * d.astype(np.float64))


def k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 sub-block scales and minimums of a Q4_K / Q5_K super-block, 6 bits each in 12 bytes
    [..., 12] -> ([..., 8], [..., 8]) (ggml's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes
    0-3 and 4-7, sub-blocks 4-7 in the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 and 4-7)."""
    scale_bytes, min_bytes, mixed = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = np.concatenate([scale_bytes & 63, (mixed & 15) | ((scale_bytes >> 6) << 4)], axis=-1)
    minimums = np.concatenate([min_bytes & 63, (mixed >> 4) | ((min_bytes >> 6) << 4)], axis=-1)
    return scales, minimums


def k_affine(raw: np.ndarray, centre: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block of 32 of a Q4_K / Q5_K super-block [N, S, bytes] (f16 d, f16 dmin, 12 bytes of scales):
    the scale D = d * sc [N, S*8] float32 and the offset centre * D - dmin * m [N, S*8] float64, so that
    w = D * q - dmin * m = D * (q - centre) + offset."""
    scales, minimums = k_scales(raw[..., 4:16])
    step = halves(raw, 0)[..., None] * scales.astype(np.float32)  # [N, S, 8], exact: 11 x 6 bits
    minimum = halves(raw, 2)[..., None].astype(np.float64) * minimums
    return by_row(step), by_row(centre * step.astype(np.float64) - minimum)


def q4_k(raw: np.ndarray) -> Blocks:
    """144 bytes: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of nibbles (per 64 weights: 32 bytes, sub-block
    2i in the low nibbles, 2i + 1 in the high ones); w = d sc_i * q - dmin m_i -> 4 bits, q, per 32."""
    rows, supers = raw.shape[:2]
    levels = nibbles(raw[..., 16:].reshape(rows, supers, 4, 32))  # [N, S, 4, 64]
    step, offset = k_affine(raw, 8)
    return Blocks(4, by_row(levels), step, offset)


def q5_k(raw: np.ndarray) -> Blocks:
    """176 bytes: Q4_K's fields, then 32 bytes of high bits (bit i of byte l: element l of sub-block i), then
    the 128 bytes of nibbles -> 8 bits, q + 112, per 32."""
    rows, supers = raw.shape[:2]
    low = nibbles(raw[..., 48:].reshape(rows, supers, 4, 32)).reshape(rows, supers, 8, 32)
    high = bits_of(raw[..., 16:48]).reshape(rows, supers, 32, 8).swapaxes(-1, -2)  # [N, S, 8, 32]
    step, offset = k_affine(raw, 16)
    return Blocks(8, by_row((low | (high << 4)) + 112), step, offset)


def q6_k(raw: np.ndarray) -> Blocks:
    """210 bytes: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, f16 d. Per half of 128
    weights, element 32k + l (k < 4, l < 32) has the nibble (k >> 1) of low byte l + 32 (k & 1) and the bit
    pair k of high byte l; w = d sc_j * (q - 32) for the sub-block j of 16 -> 8 bits, q + 96, per 16."""
    rows, supers = raw.shape[:2]
    low = raw[..., :128].reshape(rows, supers, 2, 2, 32)  # [N, S, half, l >= 32, 32]
    low = np.stack([low & 15, low >> 4], axis=3).reshape(rows, supers, 2, 4, 32)  # [.., half, k, l]
    high = raw[..., 128:192].reshape(rows, supers, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]
    levels = low | ((high & 3) << 4)  # [N, S, 2, 4, 32] in 0..63
    step = halves(raw, 208)[..., None] * raw[..., 192:208].view(np.int8).astype(np.float32)  # [N, S, 16]
    return Blocks(8, by_row(levels + 96), by_row(step), block_size=16)


# GGUF type -> (bytes per block of 32 or super-block of 256 weights, decoder)
DECODERS: dict[str, tuple[int, Callable[[np.ndarray], Blocks]]] = {
    "Q8_0": (34, q8_0),
    "Q4_0": (18, q4_0),
    "Q4_1": (20, q4_1),
    "Q5_0": (22, q5_0),
    "Q5_1": (24, q5_1),
    "Q4_K": (144, q4_k),
    "Q5_K": (176, q5_k),
    "Q6_K": (210, q6_k),
}
# GGUF type -> the bits of its decoded blocks (5- and 6-bit levels go to 8-bit blocks), as its decoder makes them
BITS = {kind: decoder(np.zeros((1, 1, size), np.uint8)).bits for kind, (size, decoder) in DECODERS.items()}


# GGUF types a grains-edge kernel reads as the file stores them (k_quant_matmul.cc: `{kind}MatMul`): their bytes
# stay with the blocks
RAW_KINDS = ("Q4_0", "Q4_K", "Q5_K", "Q6_K")
RAW_ROW_MULTIPLE = 256  # the kernels take K in super-blocks of 256 weights (Q4_0: 8 blocks)
# GGUF types with a grains-edge kernel to go to: those read as stored, and the ones with offsets
# (Q4_1MatMul, or folded offsets when it does not fit)
KERNEL_KINDS = {*RAW_KINDS, "Q4_1", "Q5_1", "Q4_K", "Q5_K"}


def decode(kind: str, data: np.ndarray) -> Blocks | None:
    """Blocks of a GGUF tensor (data [N, bytes per row] uint8), or None for other types."""
    if kind not in DECODERS:
        return None
    size, decoder = DECODERS[kind]
    raw = np.ascontiguousarray(data) if kind in RAW_KINDS else None
    return dataclasses.replace(decoder(data.reshape(data.shape[0], -1, size)), kinds=(kind,), raw=raw)


# --- rows: q/k un-permuted, linears side by side ----------------------------------------------------


def unpermute_rows(blocks: Blocks, heads: int) -> Blocks:
    """Undo llama.cpp's q/k row permutation (rows [heads, 2, half] stored as [heads, half, 2])."""
    rows = np.arange(blocks.shape[0])
    order = rows.reshape(heads, rows.size // heads // 2, 2).swapaxes(2, 1).reshape(-1)
    offsets = None if blocks.offsets is None else blocks.offsets[order]
    raw = None if blocks.raw is None else blocks.raw[order]
    return dataclasses.replace(blocks, q=blocks.q[order], scales=blocks.scales[order], offsets=offsets, raw=raw)


def widened(blocks: Blocks, bits: int, block_size: int, offsets: bool) -> Blocks:
    """The same weight in a format at least as wide, exactly: levels moved to the zero point 2^(bits-1),
    each block's scale (and offset) repeated over its smaller blocks, zero offsets where `offsets` asks."""
    repeat = blocks.block_size // block_size
    scales = np.repeat(blocks.scales, repeat, axis=1)
    if blocks.offsets is not None:
        added = np.repeat(blocks.offsets, repeat, axis=1)
    else:
        added = np.zeros(scales.shape) if offsets else None
    q = blocks.q + np.uint8((1 << (bits - 1)) - blocks.zero_point)
    return Blocks(bits, q, scales, added, block_size, blocks.kinds)


def stacked(parts: list[Blocks]) -> Blocks:
    """Row-wise concatenation of weights (a fused q|k|v or gate|up) in their widest format: the most bits,
    the smallest blocks, offsets if any part has them (Q4_K_M's Q4_K q and k beside a Q6_K v: 8 bits,
    blocks of 16, offsets)."""
    bits, size = max(p.bits for p in parts), min(p.block_size for p in parts)
    offsets = any(p.offsets is not None for p in parts)
    kinds = tuple(sorted({kind for p in parts for kind in p.kinds}))
    raw = np.concatenate([p.raw for p in parts]) if all(p.raw is not None for p in parts) and len(kinds) == 1 else None
    read = tuple(parts) if len(kinds) > 1 else ()
    parts = [widened(p, bits, size, offsets) for p in parts]
    return Blocks(
        bits,
        np.concatenate([p.q for p in parts]),
        np.concatenate([p.scales for p in parts]),
        np.concatenate([p.offsets for p in parts]) if offsets else None,
        size,
        kinds,
        raw,
        read,
    )


# --- offsets: folded into extra K columns, or Q4_1 kernel fields ------------------------------------


def offset_columns(cols: int, block_size: int = BLOCK) -> int:
    """Extra K columns that `folded` adds to a [N, cols] weight in blocks of `block_size`: OFFSET_DIGITS
    copies of the block sums, each padded to whole blocks."""
    groups = -(-(cols // block_size) // block_size)  # groups of up to block_size offsets, one block each
    return OFFSET_DIGITS * groups * block_size


def block_sum_indicator(cols: int, block_size: int = BLOCK) -> Blocks:
    """4-bit weight [offset_columns(cols, block_size), cols] of 0s and 1s in blocks of `block_size`:
    x @ it^T = [S, 0 pad] repeated OFFSET_DIGITS times, S [cols/block_size] the block sums of x (level 9 is 1,
    level 8 is 0, scale 1: exact)."""
    sums, extra = cols // block_size, offset_columns(cols, block_size)
    copy = extra // OFFSET_DIGITS
    q = np.full((extra, cols), 8, np.uint8)
    for digit in range(OFFSET_DIGITS):
        rows = digit * copy + np.arange(sums)  # [sums]
        q.reshape(extra, sums, block_size)[rows, np.arange(sums)] = 9
    return Blocks(4, q, np.ones((extra, sums), np.float32), block_size=block_size)


def offset_digits(blocks: Blocks) -> tuple[np.ndarray, np.ndarray]:
    """The offsets rounded for `folded`: (value [N, G, block_size] int64, unit [N, G, 1]) with offsets ≈
    value * unit per group of block_size offsets (zero padded), |value| <= (2^(bits-1) - 1) * base^(D-1),
    base = 2^bits, D = OFFSET_DIGITS."""
    rows, cols = blocks.shape
    base, size = 1 << blocks.bits, blocks.block_size
    padded = np.zeros((rows, offset_columns(cols, size) // OFFSET_DIGITS), np.float64)
    padded[:, : cols // size] = blocks.offsets
    groups = padded.reshape(rows, -1, size)  # [N, G, block_size]
    unit = np.abs(groups).max(-1, keepdims=True) / ((base // 2 - 1) * base ** (OFFSET_DIGITS - 1))  # [N, G, 1]
    # A group of zero offsets gets unit 0, so its digit blocks have scale 0: a scale of 1 with zero digits is
    # exact in floats but not in MatMulNBits' int8 path, which cancels zero-point terms of the block sums in
    # float32 (13 % of the output off for a Q6_K v widened beside Q4_K q and k).
    value = np.divide(groups, unit, out=np.zeros_like(groups), where=unit > 0)
    return np.rint(value).astype(np.int64), unit


def folded(blocks: Blocks) -> Blocks:
    """Blocks with offsets -> the same weight as [N, cols + offset_columns(cols, block_size)] blocks without
    offsets, for the input [x, block_sum_indicator(cols, block_size) @ x]: the offsets as OFFSET_DIGITS signed
    base-2^bits digits, digit i of a group scaled by unit * base^(OFFSET_DIGITS - 1 - i) (`offset_digits`)."""
    rows, _ = blocks.shape
    base, half = 1 << blocks.bits, blocks.zero_point
    value, unit = offset_digits(blocks)
    digits = []
    for _ in range(OFFSET_DIGITS - 1):
        low = (value + half) % base - half  # in -half..half-1
        digits.insert(0, low)
        value = (value - low) // base
    digits.insert(0, value)  # the top digit, in -(half-1)..half-1
    levels = [(digit + half).astype(np.uint8).reshape(rows, -1) for digit in digits]
    scales = [unit[..., 0] * float(base) ** (OFFSET_DIGITS - 1 - i) for i in range(OFFSET_DIGITS)]
    return Blocks(
        blocks.bits,
        np.concatenate([blocks.q, *levels], axis=1),
        np.concatenate([blocks.scales, *scales], axis=1).astype(np.float32),
        block_size=blocks.block_size,
    )


def without_raw(blocks: Blocks) -> Blocks:
    """The same blocks without their GGUF bytes (and so without a kernel that reads them)."""
    return dataclasses.replace(blocks, raw=None, parts=tuple(without_raw(part) for part in blocks.parts))


def fits_raw_kernel(blocks: Blocks) -> bool:
    """Whether a grains-edge kernel reads these blocks' GGUF bytes as they are (`{kind}MatMul`): one weight of
    a RAW_KINDS type, its bytes at hand, rows of whole super-blocks."""
    single = len(blocks.kinds) == 1 and blocks.kinds[0] in RAW_KINDS
    return single and blocks.raw is not None and blocks.shape[1] % RAW_ROW_MULTIPLE == 0


def fits_q4_1_kernel(blocks: Blocks) -> bool:
    """Whether grains_edge.Q4_1MatMul can run these blocks: 4-bit, blocks of 32 with offsets, fields finite
    in float16."""
    if blocks.bits != 4 or blocks.block_size != BLOCK or blocks.offsets is None:
        return False
    with np.errstate(over="ignore"):
        return all(np.isfinite(field).all() for field in q4_1_fields(blocks)[1:])


def kernel_runs(blocks: Blocks) -> list[Blocks] | None:
    """A stack of several formats as runs of one format each, when grains-edge's kernels run every run (Q4_K
    q|k beside a Q6_K v: 4.5 and 6.56 bits per weight, where the widened stack takes 8-bit blocks of 16 with
    folded offsets); else None."""
    if not blocks.parts:
        return None
    runs = [stacked(list(group)) for _, group in itertools.groupby(blocks.parts, key=lambda part: part.kinds)]
    return runs if all(fits_raw_kernel(run) or fits_q4_1_kernel(run) for run in runs) else None


def q4_1_fields(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The GGUF Q4_1 fields of 4-bit blocks with offsets, as grains_edge.Q4_1MatMul takes them: nibbles
    [N, K/2] uint8 (ggml order: level j in the low nibble of byte j, level j + 16 in the high one), d and
    m [N, K/32] float16, w = d * q + m: exact for a GGUF's Q4_1, rounded to float16 for Q4_K's d sc_i and
    dmin m_i (`carried_error`)."""
    rows, cols = blocks.shape
    levels = blocks.q.reshape(rows, cols // BLOCK, BLOCK)
    packed = (levels[..., :16] | (levels[..., 16:] << 4)).reshape(rows, cols // 2)
    d = blocks.scales.astype(np.float16)
    m = (blocks.offsets - 8.0 * blocks.scales).astype(np.float16)
    return np.ascontiguousarray(packed), d, m


def carried_error(blocks: Blocks, custom_kernels: bool) -> float:
    """The largest |graph weight - GGUF weight| of these blocks in the graph, in level steps (|scale| of its
    block; its largest |offset| where the scale is 0): 0 without offsets or in a kernel that reads the GGUF's
    bytes (carried as they are); else the float16 fields of Q4_1MatMul (`custom_kernels` and
    `fits_q4_1_kernel`) or the digits of `folded`; a stack's runs each in its kernel (`kernel_runs`)."""
    runs = kernel_runs(blocks) if custom_kernels else None
    if runs:
        return max(carried_error(run, custom_kernels) for run in runs)
    if blocks.offsets is None or (custom_kernels and fits_raw_kernel(blocks)):
        return 0.0
    rows, cols = blocks.shape
    size = blocks.block_size
    if custom_kernels and fits_q4_1_kernel(blocks):
        _, d, m = q4_1_fields(blocks)
        scale_error = d.astype(np.float64) - blocks.scales
        offset_error = m + 8.0 * d.astype(np.float64) - blocks.offsets
    else:
        value, unit = offset_digits(blocks)
        scale_error = np.zeros(blocks.scales.shape)
        offset_error = by_row(value * unit)[:, : cols // size] - blocks.offsets
    levels = blocks.q.reshape(rows, cols // size, size)
    ends = np.stack([levels.min(-1), levels.max(-1)]).astype(np.float64) - blocks.zero_point  # [2, N, B]
    error = np.abs(scale_error * ends + offset_error).max(0)  # [N, B], linear in the level
    step = np.where(blocks.scales != 0, np.abs(blocks.scales), np.abs(blocks.offsets))
    return float((error / np.where(step > 0, step, 1)).max())


def how_carried(blocks: Blocks, custom_kernels: bool) -> tuple[str, float]:
    """How the graph carries these blocks ("exact", float16 kernel fields or folded offsets) and its
    `carried_error`."""
    error = carried_error(blocks, custom_kernels)
    if error == 0:
        return "exact", error
    if custom_kernels and (fits_q4_1_kernel(blocks) or kernel_runs(blocks)):
        return "float16 Q4_1 kernel fields", error
    return f"offsets to {blocks.bits * OFFSET_DIGITS} bits", error


def summary(carried: list[tuple[tuple[str, ...], str, float]]) -> str:
    """The export's log and manifest line for the GGUF blocks the graph took: (kinds, how, error) each."""
    kinds = sorted({kind for found, _, _ in carried for kind in found})
    errors: dict[str, list[float]] = {}
    for _, how, error in carried:
        errors.setdefault(how, []).append(error)
    ways = [
        f"{len(found)} {how}" if how == "exact" else f"{len(found)} {how} (max {max(found):.2g} of a level step)"
        for how, found in sorted(errors.items(), key=lambda item: item[0] != "exact")
    ]
    return f"{len(carried)} from the GGUF's own blocks ({', '.join(kinds)}; {', '.join(ways)})"


# --- a model's blocks, decoded as the graph takes them ----------------------------------------------


@dataclass(frozen=True)
class Source:
    """One graph weight a GGUF holds in blocks: its types, the bits it decodes to, and how to decode it."""

    kinds: tuple[str, ...]  # sorted GGUF types of its parts
    bits: int  # of its decoded blocks: a stack's widest part's
    read: Callable[[], Blocks]


class GgufBlocks(Mapping[str, Blocks]):
    """The graph's weights a GGUF stores in blocks (graph.py names), each read from the file and decoded when it
    is looked up, and not kept: decoded all at once, an 8B model's blocks would take 1.8 bytes a
    parameter beside the model."""

    def __init__(self, sources: dict[str, Source]) -> None:
        self.sources = sources

    @classmethod
    def holding(cls, blocks: dict[str, Blocks]) -> GgufBlocks:
        """Blocks already decoded (made in memory, not read from a file)."""
        return cls({name: Source(b.kinds, b.bits, lambda b=b: b) for name, b in blocks.items()})

    def __getitem__(self, name: str) -> Blocks:
        return self.sources[name].read()

    def __contains__(self, name: object) -> bool:  # Mapping's would decode the weight to find it
        return name in self.sources

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)

    def kinds(self) -> set[str]:
        """The GGUF types of all its weights, read from the file's header."""
        return {kind for source in self.sources.values() for kind in source.kinds}

    def with_bits(self, wanted: tuple[int, ...]) -> GgufBlocks:
        """Only the weights that decode to one of these widths."""
        return GgufBlocks({name: s for name, s in self.sources.items() if s.bits in wanted})

    def without_raw(self) -> GgufBlocks:
        """The same weights decoded without their GGUF bytes (`without_raw`)."""
        return GgufBlocks(
            {name: dataclasses.replace(s, read=lambda s=s: without_raw(s.read())) for name, s in self.sources.items()}
        )


@dataclass(frozen=True)
class TensorBytes:
    """Where a GGUF tensor's bytes are in its file."""

    path: Path
    offset: int
    shape: tuple[int, ...]  # [N, bytes per row]
    kind: str

    def read(self) -> np.ndarray:
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read(int(np.prod(self.shape)))
        return np.frombuffer(data, np.uint8).reshape(self.shape)


def model_blocks(path: str | Path, family: str, num_layers: int, heads: int, kv_heads: int) -> GgufBlocks:
    """The graph's weights (graph.py names: layers.{i}.qkv|o_proj|gate_up|down_proj, lm_head, and beside an
    untied head the `embedding` table) that the GGUF at `path` of a PERMUTED_QK family stores in a supported
    block format; others are absent and left to the quantizer."""
    from gguf import GGUFReader

    # each tensor's bytes are read from the file when decoded, not through the reader's mapping, whose pages
    # would stay resident (4.9 GB for an 8B Q4_K_M) until the last block is decoded
    every = GGUFReader(str(path)).tensors
    tensors = {
        tensor.name: TensorBytes(Path(path), int(tensor.data_offset), tensor.data.shape, tensor.tensor_type.name)
        for tensor in every
        if tensor.tensor_type.name in DECODERS
    }
    untied = any(tensor.name == "output.weight" for tensor in every)  # in blocks or not
    permuted = PERMUTED_QK[family]

    def source(*parts: tuple[str, int | None]) -> Source | None:
        """Parts (GGUF name, heads to un-permute or None) stacked in this order, if the file has them all."""
        if not all(name in tensors for name, _ in parts):
            return None
        kinds = [tensors[name].kind for name, _ in parts]

        def read() -> Blocks:
            found = []
            for (name, heads), kind in zip(parts, kinds, strict=True):
                blocks = decode(kind, tensors[name].read())
                found.append(unpermute_rows(blocks, heads) if heads and permuted else blocks)
            return found[0] if len(found) == 1 else stacked(found)

        return Source(tuple(sorted(set(kinds))), max(BITS[kind] for kind in kinds), read)

    table = source(("token_embd.weight", None))
    found = {"lm_head": source(("output.weight", None)), "embedding": table} if untied else {"lm_head": table}
    for i in range(num_layers):
        attn, ffn = f"blk.{i}.attn", f"blk.{i}.ffn"
        qkv = ((f"{attn}_q.weight", heads), (f"{attn}_k.weight", kv_heads), (f"{attn}_v.weight", None))
        found[f"layers.{i}.qkv"] = source(*qkv)
        found[f"layers.{i}.o_proj"] = source((f"{attn}_output.weight", None))
        found[f"layers.{i}.gate_up"] = source((f"{ffn}_gate.weight", None), (f"{ffn}_up.weight", None))
        found[f"layers.{i}.down_proj"] = source((f"{ffn}_down.weight", None))
    return GgufBlocks({name: s for name, s in found.items() if s is not None})
