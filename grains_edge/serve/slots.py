"""The running batch's KV slots: one fixed buffer per layer and kind, one row (slot) per request.

Buffers are [max_batch, kv_heads, capacity, head_dim] numpy arrays bound to ONNX Runtime by pointer, as
both `past_key_values.*` and `present.*`, so GroupQueryAttention appends every step's keys and values in
place. The active rows are kept packed in slots 0..k-1: a decode step binds the first k rows, which are one
contiguous [k, kv_heads, capacity, head_dim] block, and a row that leaves is replaced by the last row
(its KV prefix copied down), so every step runs exactly the live rows.

Rows have different lengths. A decode step's attention mask is [k, width] (width: the longest row, rounded
up) with row i's ones covering its own tokens plus the new one (right padding); the graph turns it into
seqlens_k = sum - 1 per row, which GroupQueryAttention uses as that row's past length: where it writes the
new key and value, its rotary position, and how far it attends. Newcomers' prompts run together as one step on
their slots' rows, right-padded to the longest: each row is a first prompt for GroupQueryAttention whose
length is its mask's sum, so it never sees other rows or its own padding.
"""

from __future__ import annotations

import numpy as np

from grains_edge.export.graph_io import LAST_POSITION
from grains_edge.runtime.engine import Engine

# A decode step's attention mask covers the longest row rounded up to a multiple of this, not the whole slot:
# GroupQueryAttention's work grows with the mask's width (its total_sequence_length), and a width that
# changes only every MASK_STEP tokens keeps the input shapes, so ONNX Runtime's allocation plan, stable
MASK_STEP = 64


class SlotCache:
    """KV slots for up to `max_batch` rows of up to `capacity` tokens each, with the decode-step arrays."""

    def __init__(self, engine: Engine, max_batch: int, capacity: int):
        manifest = engine.manifest
        self.engine = engine
        self.max_batch = max_batch
        self.capacity = capacity
        shape = (max_batch, manifest.num_kv_heads, capacity, manifest.head_dim)
        # zeros, not empty: unused positions are never attended, but they are read as memory; calloc keeps
        # untouched pages unallocated, so memory grows with the tokens actually cached
        self.kv = [np.zeros(shape, np.float32) for _ in engine.past_names]
        self.steering = np.zeros((max_batch, manifest.num_layers, manifest.hidden_size), np.float32)
        self.token = np.zeros((max_batch, 1), np.int64)
        self.position = np.zeros((max_batch, 1), np.int64)
        self.mask = np.zeros((max_batch, capacity), np.int64)
        self.logits = np.zeros((max_batch, 1, manifest.vocab_size), np.float32)
        self.lengths = np.zeros(max_batch, np.int64)  # tokens cached in each slot
        self.decode_binding = engine.session.io_binding()
        self.window = np.zeros((0, 0), np.int64)  # the decode steps' attention mask [rows, width], bound

    def bind(self, binding, name: str, array: np.ndarray, rows: slice, output: bool = False) -> None:
        """Bind rows of `array` (a contiguous block of it) by pointer: ORT reads and writes it in place."""
        view = array[rows]
        args = ("cpu", 0, view.dtype, list(view.shape), view.ctypes.data)
        if output:
            binding.bind_output(name, *args)
        else:
            binding.bind_input(name, *args)

    def bind_kv(self, binding, rows: slice) -> None:
        for past, present, buffer in zip(self.engine.past_names, self.engine.present_names, self.kv, strict=True):
            self.bind(binding, past, buffer, rows)
            self.bind(binding, present, buffer, rows, output=True)

    def prompts(self, first: int, rows: list[list[int]], steerings: np.ndarray, past: int = 0) -> np.ndarray:
        """Run newcomers' prompts as one step on slots first.., steerings [n, layers, hidden]; last logits [n, vocab].

        Rows are right-padded to the longest: each is a first prompt for GroupQueryAttention with its own
        length (its mask's sum), so it attends to its own tokens only, and the padding's keys land past the
        row's length, where its first decode steps overwrite them. Or one row continues: its first `past`
        tokens are already in its slot (`restore`) and the step runs the rest (GroupQueryAttention continues a
        cache for a batch of one only).
        """
        lengths = np.array([len(ids) for ids in rows], np.int64)
        for length in lengths:
            if not past < length <= self.capacity:
                raise ValueError(
                    f"a prompt of {length} tokens after {past} cached does not fit a slot of {self.capacity}"
                )
        if past and len(rows) > 1:
            raise ValueError("only a single row can continue a cached prefix")
        past_lengths = np.full(len(rows), past, np.int64)
        fresh = lengths - past_lengths  # tokens this step runs, per row
        count, width = len(rows), int(fresh.max())
        block = slice(first, first + count)
        self.steering[block] = steerings
        input_ids = np.full((count, width), self.engine.pad_id, np.int64)  # [n, width]
        for row, (ids, start) in enumerate(zip(rows, past_lengths, strict=True)):
            input_ids[row, : len(ids) - start] = ids[start:]
        attention_mask = (np.arange(int(lengths.max())) < lengths[:, None]).astype(np.int64)  # [n, longest]
        # logits of the last `keep` positions cover every row's last token: the shortest row's is the earliest
        keep = width - int(fresh.min()) + 1
        binding = self.engine.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("position_ids", past_lengths[:, None] + np.arange(width, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("logits_to_keep", np.array([keep], np.int64))
        self.bind(binding, "steering", self.steering, block)
        binding.bind_output("logits", "cpu")
        self.bind_kv(binding, block)
        self.engine.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()  # [n, keep, vocab]
        self.lengths[block] = lengths
        self.mask[block] = 0
        self.mask[block, : attention_mask.shape[1]] = attention_mask
        return logits[np.arange(count), fresh - 1 - (width - keep)]

    def restore(self, slot: int, kv: list[np.ndarray], count: int) -> None:
        """Put the first `count` positions of saved KV (per past input [kv_heads, n, head_dim]) into `slot`."""
        for buffer, part in zip(self.kv, kv, strict=True):
            buffer[slot, :, :count] = part[:, :count]

    def saved(self, slot: int) -> list[np.ndarray]:
        """Copies of the KV of `slot`'s cached tokens, per past input [kv_heads, length, head_dim]."""
        length = int(self.lengths[slot])
        return [buffer[slot, :, :length].copy() for buffer in self.kv]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """One token per active row (tokens [k], slots 0..k-1) after each row's cached tokens; logits [k, vocab]."""
        rows = len(tokens)
        if (self.lengths[:rows] >= self.capacity).any():
            raise ValueError("a row's slot is full")
        self.token[:rows, 0] = tokens
        self.position[:rows, 0] = self.lengths[:rows]
        self.mask[np.arange(rows), self.lengths[:rows]] = 1
        needed = int(self.lengths[:rows].max()) + 1
        width = min(self.capacity, -(-needed // MASK_STEP) * MASK_STEP)
        if (rows, width) != self.window.shape:  # else the same pointers and shapes: nothing to rebind
            self.window = np.zeros((rows, width), np.int64)
            binding, block = self.decode_binding, slice(0, rows)
            for name, array in (
                ("input_ids", self.token),
                ("position_ids", self.position),
                ("steering", self.steering),
            ):
                self.bind(binding, name, array, block)
            self.bind(binding, "attention_mask", self.window, slice(None))
            binding.bind_cpu_input("logits_to_keep", LAST_POSITION)
            self.bind(binding, "logits", self.logits, block, output=True)
            self.bind_kv(binding, block)
        self.window[:] = self.mask[:rows, :width]
        self.engine.session.run_with_iobinding(self.decode_binding)
        self.lengths[:rows] += 1
        return self.logits[:rows, 0].copy()

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` (its cached tokens, mask and steering) onto slot `target`."""
        length = int(self.lengths[source])
        for buffer in self.kv:
            buffer[target, :, :length] = buffer[source, :, :length]
        self.steering[target] = self.steering[source]
        self.mask[target] = self.mask[source]
        self.lengths[target] = length

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.mask[slot] = 0


def prompt_groups(lengths: list[int], cached: list[int]) -> list[tuple[list[int], int]]:
    """Split newcomers into prompt steps, (rows, the cached tokens they continue) each. A row whose cached
    start is at least half its prompt continues it in a step of its own (GroupQueryAttention continues a
    cache one row at a time); the rest run together from their first token, right-padded, where one pass
    over the weights serves them all."""
    alone = [row for row, count in enumerate(cached) if count > 0 and 2 * count >= lengths[row]]
    together = [row for row in range(len(lengths)) if row not in alone]
    groups = [([row], cached[row]) for row in alone]
    if together:
        groups.append((together, 0))
    return groups
