"""Every supported family at parity with PyTorch: a seeded tiny random-weight model per family is exported
through the real export() (with its own verification), then checked against the HF model with the same
steering applied by forward hooks, zero and a different steering per row, a prompt step and then
KV-cached steps one token at a time, past the sliding window where the family has one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from grains_edge.errors import GrainsError
from grains_edge.export import graph, graph_io
from grains_edge.export.manifest import Manifest
from grains_edge.export.onnx_export import TOLERANCE, export
from grains_edge.model import sources
from grains_edge.model.hooks import decoder_layers, steering_hooks

WINDOW = 4  # sliding window of the families that have one: the prompt and the cached steps run past it
PROMPT, LENGTH = 6, 13  # a 6-token prompt step, then 7 single-token cached steps
SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SLIDING_AND_GLOBAL = ["sliding_attention", "full_attention", "sliding_attention"]


def family_configs(vocab: int) -> dict:
    """One tiny config per family, each with the details that family's graph must get right."""
    common = dict(vocab_size=vocab, num_hidden_layers=3, max_position_embeddings=128, **SMALL)
    llama3_rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    longrope = dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=[1.0 + 0.1 * i for i in range(8)],
        long_factor=[2.0 + 0.3 * i for i in range(8)],
    )
    return {
        "llama3": LlamaConfig(**common, rope_parameters=llama3_rope, tie_word_embeddings=False),
        "mistral": MistralConfig(**common, sliding_window=WINDOW, tie_word_embeddings=False),
        "qwen2": Qwen2Config(
            **common, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True
        ),
        "qwen3": Qwen3Config(**common, tie_word_embeddings=True),
        "phi3": Phi3Config(
            **{**common, "max_position_embeddings": 256},
            original_max_position_embeddings=64,
            rope_parameters=longrope,
            sliding_window=WINDOW,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=1,
        ),
        "gemma2": Gemma2Config(
            **common,
            sliding_window=WINDOW,
            layer_types=SLIDING_AND_GLOBAL,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=10.0,
            final_logit_softcapping=15.0,
        ),
        "gemma3": Gemma3TextConfig(
            **common,
            sliding_window=WINDOW,
            layer_types=SLIDING_AND_GLOBAL,
            query_pre_attn_scalar=24,
            final_logit_softcapping=15.0,
        ),
    }


def tiny_family_model(config):
    """Seeded random weights, larger than the init default and with random norm scales and biases, so a
    missed (1 + w), bias or soft-cap shows in the logits."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0, 0.2)
            else:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["llama3", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def family_export(request, tmp_path_factory, tiny_tokenizer):
    """(the HF model, its verified export folder) for one family."""
    config = family_configs(len(tiny_tokenizer))[request.param]
    model = tiny_family_model(config)
    folder = tmp_path_factory.mktemp(f"family-{request.param}")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = folder / "export"
    export(str(folder), out, layers_spec="all")
    return model, out


def prompt_then_cached_steps(session, manifest: Manifest, ids: np.ndarray, steering: np.ndarray) -> np.ndarray:
    """Logits [batch, LENGTH, vocab]: the first PROMPT tokens in one step, then one token per cached step."""
    batch = ids.shape[0]
    empty = np.zeros((batch, manifest.num_kv_heads, 0, manifest.head_dim), np.float32)
    cache = [empty] * (2 * manifest.num_layers)
    chunks, start = [], 0
    for end in [PROMPT, *range(PROMPT + 1, LENGTH + 1)]:
        feeds = {
            graph_io.INPUT_IDS: ids[:, start:end],
            graph_io.ATTENTION_MASK: np.ones((batch, end), np.int64),
            graph_io.POSITION_IDS: np.arange(start, end)[None].repeat(batch, 0),
            graph_io.STEERING: steering,
            graph_io.LOGITS_TO_KEEP: graph_io.ALL_POSITIONS,
            **dict(zip(graph_io.past_names(manifest.num_layers), cache, strict=True)),
        }
        logits, *cache = session.run(None, feeds)
        chunks.append(logits)
        start = end
    return np.concatenate(chunks, axis=1)


def test_each_family_matches_pytorch_steered_per_row_through_cached_steps_past_the_window(family_export):
    model, out = family_export
    manifest = Manifest.load(out)
    assert manifest.verification["steered"] <= TOLERANCE  # the export's own check: prompt + one cached step
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    generator = np.random.default_rng(0)
    ids = generator.integers(3, manifest.vocab_size, (2, LENGTH))
    shifts = generator.standard_normal((2, manifest.num_layers, manifest.hidden_size)).astype(np.float32)
    shifts[1] *= -0.5  # a different steering on the second row
    for steering in (np.zeros_like(shifts), 3 * shifts):
        ours = prompt_then_cached_steps(session, manifest, ids, steering)
        with torch.no_grad(), steering_hooks(model, torch.from_numpy(steering), manifest.steered_layers):
            theirs = model(input_ids=torch.from_numpy(ids)).logits.numpy()  # [2, LENGTH, vocab]
        error = np.abs(ours - theirs).max() / max(1.0, np.abs(theirs).max())
        assert error <= TOLERANCE, f"{manifest.architecture}: relative logit error {error:.2e}"
    with torch.no_grad():  # and the steering mattered: a graph that ignored it would pass the zero case only
        unsteered = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(theirs - unsteered).max() > 100 * TOLERANCE * max(1.0, np.abs(theirs).max())


def test_the_engine_decodes_each_family_in_place_at_parity(family_export):
    """The engine's path: one KV buffer per layer bound as past and present, a mask as wide as the buffer
    with zeros past the cached tokens; steered per row, past the window."""
    from grains_edge.runtime.engine import Engine

    model, out = family_export
    engine = Engine(out, device="cpu")
    ids = np.random.default_rng(1).integers(3, engine.manifest.vocab_size, (2, LENGTH))
    steering = 3 * np.random.default_rng(2).standard_normal((2, engine.num_layers, engine.hidden_size))
    steering = steering.astype(np.float32)
    steering[1] *= -0.5
    cache = engine.new_cache(2, LENGTH + 3)
    ours = [engine.step(ids[:, :PROMPT], steering, cache)]
    ours += [engine.step(ids[:, t : t + 1], steering, cache) for t in range(PROMPT, LENGTH)]
    with torch.no_grad(), steering_hooks(model, torch.from_numpy(steering), engine.manifest.steered_layers):
        theirs = model(input_ids=torch.from_numpy(ids)).logits.numpy()[:, PROMPT - 1 :]  # [2, steps, vocab]
    error = np.abs(np.stack(ours, axis=1) - theirs).max() / max(1.0, np.abs(theirs).max())
    assert error <= TOLERANCE, f"{engine.manifest.architecture}: relative logit error {error:.2e}"


def test_a_right_padded_row_scores_as_it_does_alone(family_export):
    """Scoring (engine.forward) pads shorter rows on the right: their logits must be those of the row alone."""
    from grains_edge.runtime.engine import Engine

    model, out = family_export
    engine = Engine(out, device="cpu")
    ids = np.random.default_rng(3).integers(3, engine.manifest.vocab_size, (2, LENGTH))
    mask = np.ones_like(ids)
    mask[1, PROMPT:] = 0  # the second row is PROMPT tokens long
    ours = engine.forward(ids, mask)
    with torch.no_grad():
        alone = model(input_ids=torch.from_numpy(ids[1:, :PROMPT])).logits.numpy()[0]
        full = model(input_ids=torch.from_numpy(ids[:1])).logits.numpy()[0]
    scale = max(1.0, np.abs(full).max())
    assert np.abs(ours[0] - full).max() / scale <= TOLERANCE
    assert np.abs(ours[1, :PROMPT] - alone).max() / max(1.0, np.abs(alone).max()) <= TOLERANCE


def test_windows_and_rope_tables_come_from_the_config(family_export):
    """The spec's per-layer windows and rope tables are the ones the HF modules use."""
    model, out = family_export
    spec = graph.graph_spec(model)
    attention = [layer.self_attn for layer in decoder_layers(model)]
    windows = tuple(getattr(a, "sliding_window", None) or 0 for a in attention)
    if spec.family in ("mistral", "phi3"):  # one window for every layer, set on the config only
        windows = (model.config.sliding_window,) * spec.num_layers
    assert spec.windows == windows
    if spec.family == "phi3":  # longrope's short factors hold up to the original context only
        assert Manifest.load(out).max_context == 64 == spec.max_context
    graph_ops = onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
    attention_nodes = [n for n in graph_ops if n.op_type == "GroupQueryAttention"]
    assert [n.input[7] for n in attention_nodes] == [f"rope.{kind}.cos".replace(".default", "") for kind in spec.rope]


def test_node_names_say_where_each_node_is(family_export):
    _, out = family_export
    names = [n.name for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert len(set(names)) == len(names)
    for layer in range(3):
        assert f"/model/layers.{layer}/attn/qkv/MatMul" in names
        assert f"/model/layers.{layer}/attn/GroupQueryAttention" in names
        assert f"/model/layers.{layer}/steer/Div" in names


def test_the_supported_families_are_the_graph_families_and_others_are_refused_in_one_line():
    assert set(sources.SUPPORTED_ARCHITECTURES) == set(graph.FAMILIES)
    with pytest.raises(GrainsError) as refused:
        sources.check_architecture("mamba")
    message = str(refused.value)
    assert "\n" not in message and all(family in message for family in graph.FAMILIES)


def test_a_rope_that_changes_with_the_sequence_length_is_refused_in_one_line(tiny_tokenizer):
    config = family_configs(len(tiny_tokenizer))["llama3"]
    config.rope_parameters = dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)
    with pytest.raises(GrainsError, match="rope_type 'dynamic'.*fix:") as refused:
        graph.graph_spec(tiny_family_model(config))
    assert "\n" not in str(refused.value)


def test_decoder_layers_are_found_where_each_family_keeps_them():
    """Gemma-3 with its vision tower nests the text model as language_model."""
    blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    nested = torch.nn.Module()
    nested.model = torch.nn.Module()
    nested.model.language_model = torch.nn.Module()
    nested.model.language_model.layers = blocks
    assert decoder_layers(nested) is blocks
    with pytest.raises(TypeError):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_quantized_exports_of_the_new_families_verify(family, tmp_path, tiny_tokenizer):
    """int8 rounds every MatMul (q|k|v, gate|up, the head) whatever the family's extra ops around them."""
    model = tiny_family_model(family_configs(len(tiny_tokenizer))[family])
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    manifest = export(str(tmp_path / "model"), tmp_path / "out", quantize="int8")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node]
    assert "MatMul" not in ops and ops.count("MatMulNBits") == 4 * manifest.num_layers + 1
    assert manifest.verification["steering_effect_correlation"] > 0.9
