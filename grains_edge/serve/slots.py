"""The running batch's KV slots: one fixed buffer per layer and kind, one row (slot) per request.

Buffers are [max_batch, kv_heads, capacity, head_dim] numpy arrays bound to ONNX Runtime by pointer, as
both `past_key_values.*` and `present.*`, so GroupQueryAttention appends every step's keys and values in
place. The active rows are kept packed in slots 0..k-1: a decode step binds the first k rows, which are one
contiguous [k, kv_heads, capacity, head_dim] block, and a row that leaves is replaced by the last row
(its KV prefix copied down), so every step runs exactly the live rows.

Rows have different lengths. A decode step's attention mask is [k, width] (width: the longest row, rounded
up) with row i's ones covering its own tokens plus the new one (right padding); the graph turns it into
seqlens_k = sum - 1 per row, which GroupQueryAttention uses as that row's past length: where it writes the
new key and value, its rotary position, and how far it attends. A newcomer's prompt runs as its own batch-1
step on its slot's row, a first prompt for GroupQueryAttention (mask width = prompt length), so it never
sees other rows.
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

    def prompt(self, slot: int, ids: list[int], steering: np.ndarray) -> np.ndarray:
        """Run a new row's prompt on slot `slot` with steering [layers, hidden]; returns its last logits [vocab]."""
        if not 0 < len(ids) <= self.capacity:
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit a slot of {self.capacity}")
        self.steering[slot] = steering
        binding = self.engine.session.io_binding()
        rows = slice(slot, slot + 1)
        input_ids = np.asarray([ids], np.int64)  # [1, seq]
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("position_ids", np.arange(len(ids), dtype=np.int64)[None])
        binding.bind_cpu_input("attention_mask", np.ones((1, len(ids)), np.int64))
        binding.bind_cpu_input("logits_to_keep", LAST_POSITION)
        self.bind(binding, "steering", self.steering, rows)
        binding.bind_output("logits", "cpu")
        self.bind_kv(binding, rows)
        self.engine.session.run_with_iobinding(binding)
        self.lengths[slot] = len(ids)
        self.mask[slot] = 0
        self.mask[slot, : len(ids)] = 1
        return binding.get_outputs()[0].numpy()[0, -1]

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
