"""Profiles to and from GGUF control vectors (llama.cpp, repeng): exact round trip, foreign files, the layer map."""

import json

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grains_edge.errors import GrainsError
from grains_edge.model.hooks import steering_hooks
from grains_edge.steer.control_vectors import export_gguf, import_gguf
from grains_edge.steer.profiles import Profile, steering_tensor
from tests.conftest import tiny_model

LAYERS, HIDDEN = 4, 8


def sample(layers=(1, 3), alpha=0.02) -> Profile:
    vectors = np.random.default_rng(0).standard_normal((LAYERS, HIDDEN)).astype(np.float32)
    tuning = json.dumps({"sweep": [{"alpha": 0.01}, {"alpha": 0.03}], "chosen": {"alpha": 0.02}})
    metadata = {"source": "pairs.json", "fingerprint": "abcd", "tuning": tuning, "created": "2026-12-05"}
    return Profile("calm", vectors, list(layers), alpha, "grains", metadata)


def write_like_repeng(path, directions: dict[int, np.ndarray], model_type="llama", count_type="uint32") -> None:
    """The field layout of repeng's ControlVector.export_gguf (repeng/extract.py), reproduced, not imported."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    getattr(writer, f"add_{count_type}")(f"{arch}.layer_count", len(directions))
    for layer in directions:
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_like_llama_cpp(path, strength: float) -> tuple[int, np.ndarray]:
    """common_control_vector_load_one (llama.cpp common/common.cpp): n_embd and data[(N - 1) * n_embd ...] +=
    strength * direction.N, N >= 1, every tensor a direction.N of F32 1-D; anything else skips the file."""
    reader = gguf.GGUFReader(path)
    n_embd, data = -1, np.zeros(0, np.float32)
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        assert prefix == "direction" and index.isdigit() and int(index) > 0, tensor.name
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 1
        n_embd = int(tensor.shape[0]) if n_embd == -1 else n_embd
        layer = int(index)
        data = np.pad(data, (0, max(0, n_embd * layer - data.size)))
        data[n_embd * (layer - 1) : n_embd * layer] += strength * np.asarray(tensor.data, np.float32)
    return n_embd, data


def test_profile_to_gguf_to_profile_is_exact(tmp_path):
    profile = sample()
    assert export_gguf(profile, tmp_path / "calm.gguf", "llama") == [1, 3]
    back = import_gguf(tmp_path / "calm.gguf", LAYERS, HIDDEN)
    assert (back.name, back.method, back.layers, back.alpha) == ("calm", "grains", [1, 3], 0.02)
    assert back.metadata == profile.metadata
    np.testing.assert_array_equal(back.vectors, profile.vectors)  # the rows it does not steer too
    assert [p.name for p in tmp_path.iterdir()] == ["calm.gguf"]  # no temporary file left


def test_an_exported_file_adds_what_grains_edge_adds_before_the_renormalization(tmp_path):
    """What llama.cpp's loader builds from the file at scale α is our steering tensor, shifted by its layer 0."""
    profile = sample()
    export_gguf(profile, tmp_path / "calm.gguf", "llama")
    reader = gguf.GGUFReader(tmp_path / "calm.gguf")
    assert bytes(reader.get_field("general.architecture").parts[-1]).decode() == "controlvector"
    assert bytes(reader.get_field("controlvector.model_hint").parts[-1]).decode() == "llama"
    n_embd, data = load_like_llama_cpp(tmp_path / "calm.gguf", profile.alpha)
    expected = steering_tensor(profile)[1:].ravel()  # llama.cpp keeps no row for layer 0
    assert n_embd == HIDDEN
    np.testing.assert_allclose(np.pad(data, (0, expected.size - data.size)), expected, rtol=1e-6)


def test_layer_0_is_never_written(tmp_path):
    profile = sample(layers=(0, 2))
    with pytest.raises(GrainsError, match="layer 0"):
        export_gguf(profile, tmp_path / "p.gguf", "llama")
    assert not (tmp_path / "p.gguf").exists()
    assert export_gguf(profile, tmp_path / "p.gguf", "llama", drop_layer_0=True) == [2]
    load_like_llama_cpp(tmp_path / "p.gguf", 1.0)  # every tensor passes llama.cpp's checks
    back = import_gguf(tmp_path / "p.gguf", LAYERS, HIDDEN)
    assert back.layers == [2]
    np.testing.assert_array_equal(back.vectors, profile.vectors)  # layer 0's row kept, unsteered


@pytest.mark.parametrize("count_type", ["uint32", "int32"])
def test_a_repeng_file_imports_with_its_directions_on_the_same_layers(tmp_path, count_type):
    rng = np.random.default_rng(1)
    directions = {layer: rng.standard_normal(HIDDEN).astype(np.float32) for layer in (3, 2, 1)}
    write_like_repeng(tmp_path / "happy.gguf", directions, count_type=count_type)
    profile = import_gguf(tmp_path / "happy.gguf", LAYERS, HIDDEN)
    assert (profile.name, profile.layers, profile.alpha, profile.method) == ("happy", [1, 2, 3], 1.0, "gguf")
    assert profile.metadata["model_hint"] == "llama"
    for layer, direction in directions.items():
        np.testing.assert_array_equal(profile.vectors[layer], direction)
    assert not profile.vectors[0].any()


def residual_stream(model, tokens, steering=None) -> list[torch.Tensor]:
    """What enters each block, then the final norm: entry k is Hugging Face's hidden_states[k] (the output of block
    k - 1), read by pre-hooks so that it is what the next module really receives."""
    seen = []
    modules = [*model.model.layers, model.model.norm]
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone())) for m in modules]
    try:
        with torch.no_grad():
            if steering is None:
                model(tokens)
            else:
                with steering_hooks(model, torch.from_numpy(steering)[None]):  # [1, layers, hidden]
                    model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_an_imported_direction_n_steers_the_output_of_block_n(tmp_path):
    """A repeng file's direction.N is added to the output of 0-based block N: Hugging Face hidden_states[N + 1] is
    the first to change, as in llama.cpp (build_cvec after block il) and repeng (hidden_states[layer + 1])."""
    model = tiny_model("llama")
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    tokens = torch.tensor([[5, 17, 42, 7]])
    plain = residual_stream(model, tokens)
    for layer in range(1, layers):
        write_like_repeng(tmp_path / f"d{layer}.gguf", {layer: np.linspace(-2, 2, hidden, dtype=np.float32)})
        profile = import_gguf(tmp_path / f"d{layer}.gguf", layers, hidden)
        steered = residual_stream(model, tokens, steering_tensor(profile))
        changed = [not torch.allclose(a, b) for a, b in zip(plain, steered, strict=True)]
        assert changed.index(True) == layer + 1


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda w: w.add_tensor("direction.1", np.ones(HIDDEN + 1, np.float32)), r"not \[8\]"),
        (lambda w: w.add_tensor("direction.1", np.ones(HIDDEN, np.float16)), "not F32"),
        (lambda w: w.add_tensor("direction.1", np.ones((2, HIDDEN), np.float32)), "shape"),
        (lambda w: w.add_tensor("output.weight", np.ones(HIDDEN, np.float32)), "only direction.N"),
        (lambda w: w.add_tensor("direction.9", np.ones(HIDDEN, np.float32)), r"layers \[9\]"),
        (lambda w: w.add_tensor("direction.1", np.full(HIDDEN, np.nan, np.float32)), "NaN"),
        (lambda w: None, "no direction.N"),
    ],
)
def test_a_file_that_cannot_steer_this_model_is_refused_in_one_line(tmp_path, build, problem):
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "controlvector")
    build(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GrainsError, match=problem) as refused:
        import_gguf(tmp_path / "bad.gguf", LAYERS, HIDDEN)
    assert "fix:" in str(refused.value) and "\n" not in str(refused.value)


def test_a_model_gguf_is_not_a_control_vector(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_tensor("direction.1", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GrainsError, match="GGUF of 'llama', not a control vector"):
        import_gguf(tmp_path / "model.gguf", LAYERS, HIDDEN)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.builds(lambda tail: b"GGUF\x03\x00\x00\x00" + tail, st.binary())))
def test_random_bytes_as_a_control_vector_are_a_grains_error(tmp_path, content):
    (tmp_path / "random.gguf").write_bytes(content)
    with pytest.raises(GrainsError):
        import_gguf(tmp_path / "random.gguf", LAYERS, HIDDEN)


@pytest.fixture
def llama_cpp():
    """llama-cpp-python (the `bench` extra), skipped before any model is exported when it is not installed."""
    return pytest.importorskip("llama_cpp")


@pytest.mark.slow
def test_an_exported_file_moves_llama_cpp_like_it_moves_grains_edge(tmp_path, llama_cpp, default_export):
    """llama.cpp (through llama-cpp-python) takes an exported profile as llama.cpp's loader reads the file, and
    its next-token logits move the way the ONNX engine's do: the two changes correlate."""
    import bench_llamacpp as bench

    from grains_edge.runtime.engine import Engine
    from grains_edge.steer.profiles import load_profile

    profile = load_profile("truthful")
    export_gguf(profile, tmp_path / "truthful.gguf", "llama")
    n_embd, data = load_like_llama_cpp(tmp_path / "truthful.gguf", profile.alpha)
    runner = bench.LlamaRunner(bench.default_gguf(), threads=1, n_ctx=64, n_batch=64)
    try:
        vector = np.zeros((runner.n_layer, n_embd), np.float32)
        vector[1 : 1 + data.size // n_embd] = data.reshape(-1, n_embd)
        prompt = runner.tokenize(
            "<|im_start|>user\nIs the Great Wall visible from space?<|im_end|>\n<|im_start|>assistant\n"
        )

        def last_logits(ctx) -> np.ndarray:
            tokens = (llama_cpp.llama_token * len(prompt))(*prompt)  # kept alive through the decode
            batch = llama_cpp.llama_batch_get_one(tokens, len(prompt))
            assert llama_cpp.llama_decode(ctx, batch) == 0
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(runner.n_vocab,)).copy()

        plain, steered = runner.new_context(), runner.new_context()
        runner.set_control_vector(steered, vector * 8, 1, runner.n_layer - 1)
        theirs = last_logits(steered) - last_logits(plain)
    finally:
        runner.close()
    engine = Engine(default_export)
    ids = np.array([prompt], np.int64)
    mask = np.ones_like(ids)
    ours = (
        engine.forward(ids, mask, steering_tensor(profile, 8 * profile.alpha))[0, -1] - engine.forward(ids, mask)[0, -1]
    )
    assert np.corrcoef(theirs, ours)[0, 1] > 0.5
