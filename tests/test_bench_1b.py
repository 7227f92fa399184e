"""bench/bench_1b.py's helpers: the config it builds its model from, the parameter count its 8B projection
scales by, the line it projects along; and the bytes a decode step reads (bench_speed's, its roofline) on an
export in a GGUF's own formats."""

from __future__ import annotations

from pathlib import Path

import bench_1b
import bench_speed
import onnx
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from grains_edge.export import onnx_export
from tests import test_gguf_k_quants

DEFAULT = {  # what bench_1b takes from the default model's config, with a small vocabulary
    "vocab_size": 300,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "max_position_embeddings": 128,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "num_hidden_layers": 30,  # not inherited: the dimensions decide
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
}


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_is_the_built_models(tied) -> None:
    config = bench_1b.llama_config(DEFAULT, {**TINY, "tie_word_embeddings": tied})
    model = LlamaForCausalLM(LlamaConfig(**config))
    assert model.config.tie_word_embeddings is tied
    counted = sum(p.numel() for p in model.parameters())  # a tied head is one parameter
    assert bench_1b.parameter_count(config) == counted


def test_config_takes_the_dimensions_and_the_default_models_vocabulary() -> None:
    config = bench_1b.llama_config(DEFAULT, TINY)
    model = LlamaForCausalLM(LlamaConfig(**config))
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert model.get_input_embeddings().weight.shape == (300, 64)
    assert model.config.eos_token_id == 2 and model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # 2 KV heads of 64 / 4


def test_one_billion_config_is_one_billion_parameters() -> None:
    config = bench_1b.llama_config(DEFAULT | {"vocab_size": 49152}, bench_1b.DIMENSIONS_1B)
    assert 1.0e9 < bench_1b.parameter_count(config) < 1.2e9
    eight = bench_1b.llama_config(DEFAULT, bench_1b.DIMENSIONS_8B)
    assert 8.0e9 < bench_1b.parameter_count(eight) < 8.1e9  # Llama-3.1-8B: 8.03B


def test_fitted_projects_along_the_line_through_the_points() -> None:
    line = lambda p: 1200 + 4.5e-6 * p  # noqa: E731  (MB at p parameters)
    fit = bench_1b.fitted([(3.4e8, line(3.4e8)), (1.07e9, line(1.07e9))], 8.03e9)
    assert fit["projected"] == pytest.approx(line(8.03e9))
    assert fit["per_billion"] == pytest.approx(4500) and fit["intercept"] == pytest.approx(1200)


@pytest.mark.usefixtures("needs_kernels")
def test_an_export_in_the_gguf_s_own_formats_reads_what_llama_cpp_reads(tmp_path, monkeypatch, tiny_tokenizer):
    """Every linear in a kernel that reads the GGUF's own bytes (Q4_0, Q4_K, Q6_K and the tied Q6_K head) or its
    fields (Q4_1's nibbles, d and m: its 20 bytes per 32 weights), a Q4_K q|k beside a Q6_K v split in two: the
    export's step reads exactly the GGUF's matrices, and no linear is left to ONNX Runtime's own kernels."""
    layers = [  # q, k, v, o, gate, up, down
        ("Q4_1", "Q4_1", "Q4_1", "Q6_K", "Q4_0", "Q4_0", "Q6_K"),
        ("Q4_K", "Q4_K", "Q6_K", "Q4_0", "Q4_1", "Q4_1", "Q4_K"),
    ]
    monkeypatch.setattr(test_gguf_k_quants, "LAYER_KINDS", layers)
    gguf = tmp_path / "tiny.gguf"
    test_gguf_k_quants.write_llama_gguf(gguf, tiny_tokenizer, tied=True, table="Q6_K")
    out = tmp_path / "out"
    onnx_export.export(str(gguf), out, layers_spec="0-1", quantize="int4", kernels="fused")
    assert bench_speed.export_weight_bytes(Path(out)) == bench_speed.gguf_weight_bytes(gguf)
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert {"Q4_0MatMul", "Q4_1MatMul", "Q4_KMatMul", "Q6_KMatMul", "Q6_KGather"} <= ops
    assert not ops & {"MatMulNBits", "MatMul", "Gemm"}
