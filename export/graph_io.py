"""The steered graph's interface: its inputs and outputs by name, in order, and what they mean.

`graph.py` builds the graph with these names, `onnx_export.py` feeds them to verify it, the manifest
records them and the engine binds them; nothing else spells or slices them.

  inputs   input_ids [b, s] int64
           attention_mask [b, total] int64 (1 = token, right padding only)
           position_ids [b, s] int64 (learned position tables; rotary positions come from the mask)
           steering [b, num_layers, hidden] float32
           logits_to_keep [1] int64 (k: logits of the last k positions only; 0 = all)
           past_key_values.{i}.key|value [b, kv_heads, past, head_dim] float32
  outputs  logits [b, k, vocab] float32
           present.{i}.key|value [b, kv_heads, total or buffer, head_dim] float32
"""

from __future__ import annotations

import numpy as np

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, STEERING, LOGITS_TO_KEEP = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "steering",
    "logits_to_keep",
)
LOGITS = "logits"
# logits_to_keep: a decode step needs the last position's logits only; scoring needs every position's
LAST_POSITION, ALL_POSITIONS = np.ones(1, np.int64), np.zeros(1, np.int64)


def past_names(num_layers: int) -> list[str]:
    """The KV cache inputs, key then value per layer."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """The KV cache outputs, in the order of `past_names`."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order, for a model of `num_layers` layers."""
    fixed = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, STEERING, LOGITS_TO_KEEP]
    return [*fixed, *past_names(num_layers)], [LOGITS, *present_names(num_layers)]
