"""CachedAttention (grains_edge/kernels/cached_attention.cc) against ONNX Runtime's GroupQueryAttention, the op
whose contract it keeps: a decode step and a prompt step into caches held in place (its own kernels) give the
same output and the same caches, with and without rotary embedding, a local window, packed or separate q, k, v,
rows of different lengths, prompts starting a row (right-padded to the longest, too) or continuing it; any other
step (a cache not in place) is GroupQueryAttention's own result, bit for bit."""

import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from grains_edge import kernels

pytestmark = pytest.mark.usefixtures("needs_kernels")
HEADS, KV_HEADS, CAPACITY = 4, 2, 64


def session(op: str, dim: int, rotary: bool, packed: bool, window: int) -> ort.InferenceSession:
    """One attention node (`op`: GroupQueryAttention or CachedAttention) with the graph's inputs and outputs."""
    names = ["query", "key" if not packed else "", "value" if not packed else "", "past_key", "past_value"]
    names += ["seqlens_k", "total_sequence_length"] + (["cos_cache", "sin_cache"] if rotary else [])
    attributes = dict(num_heads=HEADS, kv_num_heads=KV_HEADS, scale=0.0)
    attributes.update(do_rotary=1, rotary_interleaved=0) if rotary else None
    attributes.update(local_window_size=window) if window >= 0 else None
    domain = "com.microsoft" if op == "GroupQueryAttention" else kernels.DOMAIN
    node = helper.make_node(op, names, ["output", "present_key", "present_value"], domain=domain, **attributes)
    types = {"seqlens_k": TensorProto.INT32, "total_sequence_length": TensorProto.INT32}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in names if n]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    opsets = [helper.make_opsetid(domain, 1) for domain in ("com.microsoft", kernels.DOMAIN)]
    opsets.append(helper.make_opsetid("", 20))
    model = helper.make_model(helper.make_graph([node], op, inputs, outputs), opset_imports=opsets)
    options = ort.SessionOptions()
    kernels.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds(dim: int, lengths: list[int], tokens: int, rotary: bool, packed: bool, cache: int) -> dict:
    """Random inputs for rows whose caches hold `lengths` tokens, `tokens` new ones each; rope tables as the
    export builds them (base 10000)."""
    rng = np.random.default_rng(dim + tokens)
    rows = len(lengths)
    out = {}
    if packed:
        out["query"] = rng.normal(size=(rows, tokens, (HEADS + 2 * KV_HEADS) * dim)).astype(np.float32)
    else:
        out["query"] = rng.normal(size=(rows, tokens, HEADS * dim)).astype(np.float32)
        out["key"], out["value"] = rng.normal(size=(2, rows, tokens, KV_HEADS * dim)).astype(np.float32)
    out["past_key"], out["past_value"] = rng.normal(size=(2, rows, KV_HEADS, cache, dim)).astype(np.float32)
    out["seqlens_k"] = np.array(lengths, np.int32) + tokens - 1
    out["total_sequence_length"] = np.array(max(lengths) + tokens, np.int32)
    if rotary:
        angles = np.arange(CAPACITY)[:, None] / 10000 ** (np.arange(0, dim, 2) / dim)  # [positions, d / 2]
        out["cos_cache"], out["sin_cache"] = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return out


def run_in_place(sess: ort.InferenceSession, inputs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step with the caches bound as both past and present, as the engine binds them: (output, keys, values)."""
    keys, values = inputs["past_key"].copy(), inputs["past_value"].copy()
    binding = sess.io_binding()
    for name, value in inputs.items():
        array = {"past_key": keys, "past_value": values}.get(name, value)
        binding.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    rows, tokens = inputs["query"].shape[:2]
    output = np.full((rows, tokens, HEADS * keys.shape[-1]), np.nan, np.float32)  # NaN: any element left unwritten
    for name, array in (("present_key", keys), ("present_value", values), ("output", output)):
        binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
    sess.run_with_iobinding(binding)
    return output, keys, values


@pytest.mark.parametrize(
    ("dim", "rotary", "packed", "window"),
    [(64, True, True, -1), (64, True, False, -1), (32, False, True, -1), (64, True, True, 8), (128, True, True, 3)],
)
def test_a_decode_step_in_place_is_group_query_attention_s(dim, rotary, packed, window):
    inputs = feeds(dim, [5, 17, 40], 1, rotary, packed, CAPACITY)
    theirs = run_in_place(session("GroupQueryAttention", dim, rotary, packed, window), inputs)
    ours = run_in_place(session("CachedAttention", dim, rotary, packed, window), inputs)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6, atol=1e-6)  # the new keys, rotated, in place
    np.testing.assert_array_equal(ours[2], theirs[2])


@pytest.mark.parametrize(
    ("dim", "rotary", "packed", "window", "lengths", "tokens"),
    [
        (64, True, True, -1, [0], 37),  # a first prompt: two whole blocks of 16 and a partial one
        (64, True, False, -1, [0, 0], 16),  # two rows' first prompts, one block each
        (64, True, True, -1, [17], 3),  # a prompt continuing a cached row
        (64, True, True, 5, [9], 40),  # a local window, shorter than a block
        (32, False, True, -1, [0], 21),
        (128, True, True, 20, [0, 0, 0], 50),  # a window spanning blocks; three rows
    ],
)
def test_a_prompt_step_in_place_is_group_query_attention_s(dim, rotary, packed, window, lengths, tokens):
    inputs = feeds(dim, lengths, tokens, rotary, packed, CAPACITY)
    theirs = run_in_place(session("GroupQueryAttention", dim, rotary, packed, window), inputs)
    ours = run_in_place(session("CachedAttention", dim, rotary, packed, window), inputs)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6, atol=1e-6)  # the new keys, rotated, in place
    np.testing.assert_array_equal(ours[2], theirs[2])


@pytest.mark.parametrize("tokens", [1, 23])  # a decode step, a prompt
def test_six_query_heads_a_kv_head_and_a_partial_chunk_of_d(tokens, monkeypatch):
    """12 query heads on 2 KV heads (the value loop takes 4 heads at a time: 4 + 2) and d 48 (not a multiple of
    the 64 floats a value chunk holds)."""
    monkeypatch.setattr(sys.modules[__name__], "HEADS", 12)
    monkeypatch.setattr(sys.modules[__name__], "KV_HEADS", 2)
    inputs = feeds(48, [30, 7] if tokens == 1 else [0, 0], tokens, rotary=True, packed=False, cache=CAPACITY)
    theirs = run_in_place(session("GroupQueryAttention", 48, True, False, -1), inputs)
    ours = run_in_place(session("CachedAttention", 48, True, False, -1), inputs)
    assert ours[0].shape == (2, tokens, 12 * 48)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [-1, 4])
def test_first_prompts_padded_to_the_longest_are_group_query_attention_s_where_real(window):
    """Three rows' first prompts of 37, 30 and 17 tokens in one step (the server's newcomers): every real
    position's output and cached key and value as GroupQueryAttention's; the padding's outputs finite."""
    real = [37, 30, 17]
    inputs = feeds(64, [0, 0, 0], 37, rotary=True, packed=True, cache=CAPACITY)
    inputs["seqlens_k"] = np.array(real, np.int32) - 1
    theirs = run_in_place(session("GroupQueryAttention", 64, True, True, window), inputs)
    ours = run_in_place(session("CachedAttention", 64, True, True, window), inputs)
    assert np.isfinite(ours[0]).all()
    for row, length in enumerate(real):
        np.testing.assert_allclose(ours[0][row, :length], theirs[0][row, :length], rtol=1e-5, atol=1e-5)
        for got, want in zip(ours[1:], theirs[1:], strict=True):  # keys and values
            np.testing.assert_allclose(got[row, :, :length], want[row, :, :length], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 9])
def test_steps_whose_caches_are_not_in_place_are_group_query_attention_s_own(tokens):
    """A decode step and a prompt step whose present caches are not the past ones (the export's verification)."""
    inputs = feeds(64, [5, 17, 40] if tokens == 1 else [0, 0, 0], tokens, rotary=True, packed=True, cache=41)
    theirs, ours = (session(op, 64, True, True, -1) for op in ("GroupQueryAttention", "CachedAttention"))
    for got, want in zip(ours.run(None, inputs), theirs.run(None, inputs), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_position_outside_the_cache_is_named():
    inputs = feeds(64, [5, 17, 40], 1, rotary=True, packed=True, cache=CAPACITY)
    inputs["seqlens_k"] = np.array([5, 17, CAPACITY], np.int32)
    with pytest.raises(Exception, match="position is outside its cache"):
        run_in_place(session("CachedAttention", 64, True, True, -1), inputs)


def test_an_export_decodes_token_by_token_as_its_prompt_step_reads_the_whole_sequence(
    tmp_path, monkeypatch, tiny_tokenizer
):
    """A tiny K-quant GGUF exported with the kernels: the engine's decode steps (CachedAttention's own kernel,
    the cache bound in place) give the logits a single prompt step over the same tokens gives (ONNX Runtime's
    GroupQueryAttention), steered."""
    from grains_edge.export import onnx_export
    from grains_edge.runtime.engine import Engine
    from tests.test_gguf_k_quants import write_llama_gguf

    gguf = tmp_path / "tiny.gguf"
    write_llama_gguf(gguf, tiny_tokenizer, tied=True, table="Q6_K")
    onnx_export.export(str(gguf), tmp_path / "out", layers_spec="0-1", quantize="int4", kernels="fused")
    engine = Engine(tmp_path / "out", device="cpu")
    rng = np.random.default_rng(0)
    steering = engine.batched_steering(
        rng.normal(0, 0.5, (engine.num_layers, engine.hidden_size)).astype(np.float32), 1
    )
    ids = rng.integers(10, 200, 12)
    cache = engine.new_cache(1, 32)
    engine.step(ids[None, :6], steering, cache)
    for end in range(7, 13):
        decoded = engine.step(ids[None, end - 1 : end], steering, cache)  # [1, vocab]
        whole = engine.step(ids[None, :end], steering, engine.new_cache(1, 32))
        np.testing.assert_allclose(decoded, whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())
