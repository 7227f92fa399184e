"""Build the steered ONNX graph of a causal LM directly from its weights: one function per family over
shared block builders.

    graph_spec(model)          every dimension and detail the graph needs, read once from the HF config
    embedding, norm, attention, gated_mlp, head      one builder per block kind
    llama_decoder / gemma_decoder / gpt2_decoder     one per family, stringing the blocks together; each
                               ends its layer loop with the same `Steering.residual_add` (llama.cpp's
                               `build_cvec(cur, il)`)

The ops are the ones ONNX Runtime runs fastest on a CPU: SimplifiedLayerNormalization / LayerNormalization,
one MatMul for q|k|v and one for gate|up, and `com.microsoft.GroupQueryAttention` (RoPE, causal mask,
sliding window, soft-capping, grouped KV heads and the KV cache in one kernel; its past and present buffers
may be the same memory, so decoding appends in place). The graph's inputs and outputs are `graph_io.py`'s.
The causal mask and rotary positions come from attention_mask (seqlens_k = sum(mask) - 1, as
GroupQueryAttention defines them); position_ids feed GPT-2's learned position table.

Families (checked against transformers' modeling_<family>.py): Llama (any static rope scaling, e.g.
Llama-3's), Mistral (sliding window), Qwen2 (q/k/v biases, sliding layers), Qwen3 (RMSNorm on q and k per
head), Phi-3 (q|k|v and gate|up fused in the checkpoint; longrope up to its original context), Gemma-2 and
Gemma-3 (RMSNorm scaled by 1 + w, embeddings scaled by sqrt(hidden), GeGLU, norms before and after attention
and MLP, query_pre_attn_scalar, local and global layers with their own rope tables, q/k norm (3), attention
and final logit soft-capping (2)), GPT-2 (LayerNorm, learned positions).

Sources: Llama (Touvron et al. 2023), GPT-2 (Radford et al. 2019), Gemma 2 and 3 (Gemma Team 2024, 2025),
RoPE (Su et al. 2021); ONNX Runtime contrib op docs (`GroupQueryAttention`, `SimplifiedLayerNormalization`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from grains_edge import kernels
from grains_edge.errors import GrainsError
from grains_edge.export import graph_io
from grains_edge.export.gguf_blocks import (
    Blocks,
    block_sum_indicator,
    fits_q4_1_kernel,
    fits_raw_kernel,
    folded,
    kernel_runs,
    q4_1_fields,
)
from grains_edge.export.weights_file import WeightsFile
from grains_edge.model import sources

OPSET = 20
# MatMulNBits accuracy level 4: int8 activations inside the kernel, like llama.cpp's q8 dot products; the
# fast path on x86 (level 1, float32 activations, is exact but 4-8x slower per decode step).
ACCURACY_LEVEL = 4
# The eps under the RMS of the steering renormalization: far below any hidden state's mean square, so the
# result is (h + s) * ||h|| / ||h + s|| to float precision, and 0 (not NaN) where h + s = 0.
STEER_EPSILON = 1e-12
# Rope types whose tables do not change with the sequence length, so one cos/sin cache holds them.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}

Linear = tuple[np.ndarray, "np.ndarray | None"]  # weight [in, out], bias [out] or None
# (linear name, float weight [N, K]) -> its quantized blocks, or None to keep it float
Quantizer = Callable[[str, np.ndarray], "Blocks | None"]


def array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


# --- the spec: every detail of the graph, read once -------------------------------------------------


@dataclass(frozen=True)
class GraphSpec:
    family: str  # config.model_type, a key of FAMILIES
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int  # positions the rope tables (or GPT-2's position table) cover
    norm: str  # "rms" (SimplifiedLayerNormalization) | "layer" (LayerNormalization, with bias)
    norm_eps: float
    norm_offset: float  # Gemma's RMSNorm scales by (1 + w): the graph stores w + offset
    activation: str  # "silu" | "gelu_tanh"
    embedding_scale: float  # Gemma multiplies looked-up embeddings by sqrt(hidden); 1 elsewhere
    attention_scale: float  # 1/sqrt(head_dim), Gemma's 1/sqrt(query_pre_attn_scalar)
    rope: tuple[str, ...]  # per layer: the name of its rotary table ("" = learned positions, GPT-2)
    windows: tuple[int, ...]  # per layer: the config's sliding window, 0 = global
    attention_softcap: float  # scores -> c * tanh(scores / c) before softmax, 0 = none (Gemma-2)
    final_softcap: float  # the same on the logits, 0 = none (Gemma-2, Gemma-3)
    qk_norm: bool  # RMSNorm on q and k per head before rope (Qwen3, Gemma-3)
    tied_head: bool  # the LM head is the embedding table


def graph_spec(model) -> GraphSpec:
    """The GraphSpec of a loaded HF causal LM; a one-line GrainsError for what the graph cannot express."""
    config = model.config
    family = config.model_type
    sources.check_architecture(family)
    gemma = family in ("gemma2", "gemma3_text")
    heads, hidden, layers = config.num_attention_heads, config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    activation = getattr(config, "hidden_activation", None) if gemma else None
    activation = activation or getattr(config, "hidden_act", None) or config.activation_function
    if activation not in ACTIVATIONS:
        raise GrainsError(f"activation '{activation}' of this {family} model is not supported; fix: use another model")
    if getattr(config, "use_bidirectional_attention", False):
        raise GrainsError(f"this {family} model attends bidirectionally; fix: use a causal (decoder) model")
    rope, max_context = rope_layout(config, family, layers)
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return GraphSpec(
        family=family,
        num_layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_context=max_context,
        norm="layer" if family == "gpt2" else "rms",
        norm_eps=float(config.layer_norm_epsilon if family == "gpt2" else config.rms_norm_eps),
        norm_offset=1.0 if gemma else 0.0,
        activation=ACTIVATIONS[activation],
        embedding_scale=hidden**0.5 if gemma else 1.0,
        attention_scale=float((config.query_pre_attn_scalar if gemma else head_dim) ** -0.5),
        rope=rope,
        windows=sliding_windows(config, layers),
        # Gemma-3's attention does not pass its config's attn_logit_softcapping on (modeling_gemma3.py)
        attention_softcap=float(config.attn_logit_softcapping or 0) if family == "gemma2" else 0.0,
        final_softcap=float(getattr(config, "final_logit_softcapping", None) or 0),
        qk_norm=family in ("qwen3", "gemma3_text"),
        tied_head=tied,
    )


def sliding_windows(config, layers: int) -> tuple[int, ...]:
    """Per layer the window of a sliding layer, 0 for global ones: `layer_types` where the config has them
    (Qwen2, Qwen3, Gemma), else the one `sliding_window` for every layer (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None) or 0
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * layers
    return tuple(window if kind == "sliding_attention" else 0 for kind in kinds)


def rope_layout(config, family: str, layers: int) -> tuple[tuple[str, ...], int]:
    """(per layer the name of its rotary table, the context the tables cover). Gemma-3 has one table per
    layer type (local and global bases); longrope (Phi-3) is static up to its original context only."""
    if family == "gpt2":
        return ("",) * layers, config.max_position_embeddings
    per_type = family == "gemma3_text"
    names = tuple(config.layer_types) if per_type else ("default",) * layers
    context = config.max_position_embeddings
    for name in sorted(set(names)):
        params = config.rope_parameters[name] if per_type else config.rope_parameters
        kind = params.get("rope_type", "default")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise GrainsError(
                f"this {family} model rotates part of each head (partial_rotary_factor); fix: use a model with "
                "full rotary embeddings"
            )
        if kind == "longrope":  # its short factors hold up to the original context, the long ones past it
            context = min(context, params.get("original_max_position_embeddings") or config.max_position_embeddings)
        elif kind not in STATIC_ROPE:
            raise GrainsError(
                f"rope_type '{kind}' changes with the sequence length, which one rope table cannot hold; "
                f"fix: use a model with one of {', '.join(STATIC_ROPE)}"
            )
    return names, int(context)


def rope_tables(model, spec: GraphSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> cos, sin [max_context, head_dim / 2] from the model's own rotary module (its scaling
    included); its original frequencies, which a longrope forward past the original context replaces."""
    rotary = decoder_body(model).rotary_emb
    positions = torch.arange(spec.max_context, dtype=torch.float32)
    tables = {}
    for name in sorted(set(spec.rope) - {""}):
        prefix = "" if name == "default" else f"{name}_"
        inv_freq = getattr(rotary, f"{prefix}original_inv_freq")
        angles = positions[:, None] * inv_freq.float()[None, :]  # [positions, d/2]
        scale = float(getattr(rotary, f"{prefix}attention_scaling", 1.0))
        tables[name] = (array(angles.cos() * scale), array(angles.sin() * scale))
    return tables


def decoder_body(model):
    """The module holding the embedding, the layers and the final norm."""
    return model.transformer if model.config.model_type == "gpt2" else model.model


def side_by_side(*linears) -> Linear:
    """[in, sum of outs] weights (and biases) of nn.Linear layers side by side: q|k|v, gate|up."""
    weight = np.concatenate([array(linear.weight).T for linear in linears], axis=1)
    biases = [linear.bias for linear in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, np.concatenate(
        [
            array(b) if b is not None else np.zeros(linear.out_features, np.float32)
            for b, linear in zip(biases, linears, strict=True)
        ]
    )


# --- the builder ------------------------------------------------------------------------------------


class GraphBuilder:
    """Accumulates nodes and initializers; `op` returns the output name(s) of the node it adds, named by
    where it is (`/model/layers.3/attn/qkv/MatMul`: the scopes open around it, then its op type).
    `blocks`: weights (by linear name, and `embedding` for an untied table) already quantized, e.g. a GGUF's own
    (`gguf_blocks.py`, which decodes one at each lookup: none is kept here); `taken` is told of each linear's;
    `custom_kernels`: Q4_0, Q4_1, Q4_K and Q6_K blocks and the steering go to grains-edge's own kernels
    (grains_edge/kernels);
    `weights_file`: where each weight's bytes go as it is added (else they stay in the initializer);
    `quantizer`: quantizes each float linear not in `blocks` as it is added, so no float copy is kept."""

    def __init__(
        self,
        blocks: Mapping[str, Blocks] | None = None,
        custom_kernels: bool = False,
        weights_file: WeightsFile | None = None,
        quantizer: Quantizer | None = None,
        taken: Callable[[Blocks], None] | None = None,
    ) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.blocks = blocks or {}
        self.made: dict[str, Blocks] = {}  # a tied head's blocks, made here from its float table
        self.taken = taken
        self.custom_kernels = custom_kernels
        self.weights_file = weights_file
        self.quantizer = quantizer
        self.scopes: list[str] = ["/model"]
        self.node_names: set[str] = set()
        self.tables: set[str] = set()  # initializers of GGUF bytes already added (gguf_table)
        # CachedAttention's plain C++ path is slower than the stock kernel: only where its vector path runs
        self.cached_attention = custom_kernels and kernels.vector_kernels()

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nodes added inside are named under `name`."""
        self.scopes.append(name)
        try:
            yield
        finally:
            self.scopes.pop()

    def part(self, weight_name: str):
        """The scope of a weight's block: the last dotted part of its name (`layers.3.qkv` -> qkv)."""
        return self.scope(weight_name.rsplit(".", 1)[-1])

    def weight(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if self.weights_file is None:
            self.initializers.append(numpy_helper.from_array(value, name))
        else:
            self.initializers.append(self.weights_file.initializer(name, value))
        return name

    def const(self, value, dtype=np.int64) -> str:
        self.count += 1
        return self.weight(f"const_{self.count}", np.asarray(value, dtype))

    def op(self, op_type: str, *inputs: str, outputs: int | list = 1, domain: str = "", **attributes):
        """Add a node; `outputs` is a count, or a list of names where None asks for a fresh name and ""
        leaves that output unused."""
        self.count += 1
        wanted = [None] * outputs if isinstance(outputs, int) else outputs
        names = [f"{op_type.lower()}_{self.count}_{k}" if n is None else n for k, n in enumerate(wanted)]
        base = "/".join([*self.scopes, op_type])
        name, copies = base, 0
        while name in self.node_names:
            copies += 1
            name = f"{base}_{copies}"
        self.node_names.add(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, domain=domain, **attributes))
        return names[0] if len(names) == 1 else names

    def linear(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, activation: str = "") -> str:
        """x @ weight (+ bias); weight is [in, out]; from self.blocks[name] when it has them, else from the
        quantizer's blocks when it makes them. With an `activation` (silu | gelu_tanh) weight is gate | up, and
        the result act(x @ gate) * (x @ up)."""
        with self.part(name):
            blocks = self.made.get(name) or self.blocks.get(name)
            if blocks is not None and name not in self.made and self.taken is not None:
                self.taken(blocks)
            if blocks is None and self.quantizer is not None:
                blocks = self.quantizer(name, weight.T)
            if blocks is None:
                y = self.op("MatMul", x, self.weight(f"{name}.weight", weight))
            elif bias is None:
                return self.block_linear(x, name, blocks, activation)
            else:
                y = self.block_linear(x, name, blocks)
            if bias is not None:
                y = self.op("Add", y, self.weight(f"{name}.bias", bias))
            return self.gate(y, activation) if activation else y

    def block_linear(self, x: str, name: str, blocks: Blocks, activation: str = "") -> str:
        """x @ blocks^T: Q4_0, Q4_K, Q5_K, Q6_K and Q4_1 blocks in grains-edge's kernels when `custom_kernels` (a
        stack of formats as one kernel per run, side by side), others in MatMulNBits, offsets folded into it. With
        an `activation`, act(gate) * up of blocks gate | up: in the kernel where one kernel takes them all."""
        runs = kernel_runs(blocks) if self.custom_kernels else None
        rows, cols = blocks.shape  # [N, K]
        gated = {"activation": activation} if activation else {}
        if runs:
            parts = [self.block_linear(x, f"{name}.{i}", run) for i, run in enumerate(runs)]
            y = self.op("Concat", *parts, axis=-1)
        elif self.custom_kernels and fits_raw_kernel(blocks):  # Q4_0MatMul, Q4_KMatMul, Q5_KMatMul, Q6_KMatMul
            table = self.gguf_table(name, blocks)
            return self.op(f"{blocks.kinds[0]}MatMul", x, table, domain=kernels.DOMAIN, K=cols, N=rows, **gated)
        elif blocks.offsets is None:
            y = self.block_matmul(x, name, blocks)
        elif self.custom_kernels and fits_q4_1_kernel(blocks):
            fields = [self.weight(f"{name}.{f}", v) for f, v in zip("qdm", q4_1_fields(blocks), strict=True)]
            return self.op("Q4_1MatMul", x, *fields, domain=kernels.DOMAIN, K=cols, N=rows, **gated)
        else:  # offsets (Q4_1, Q4_K, Q5_*): extra K columns fed by x's block sums (gguf_blocks.folded)
            indicator = block_sum_indicator(cols, blocks.block_size)
            sums = self.block_matmul(x, f"{name}.block_sums", indicator)
            y = self.block_matmul(self.op("Concat", x, sums, axis=-1), name, folded(blocks))
        return self.gate(y, activation) if activation else y

    def gate(self, y: str, activation: str) -> str:
        """act(gate) * up of y = gate | up [..., 2 * out]: SwiGLU (silu) or GeGLU (gelu_tanh)."""
        gate, up = self.op("Split", y, outputs=2, axis=-1, num_outputs=2)
        if activation == "silu":
            return self.op("Mul", self.op("Mul", gate, self.op("Sigmoid", gate)), up)
        return self.op("Mul", self.op("Gelu", gate, approximate="tanh"), up)

    def gguf_table(self, name: str, blocks: Blocks) -> str:
        """The initializer of a weight's GGUF bytes [N, bytes per row], added once: a tied table and its head
        read the same one."""
        table = f"{name}.{blocks.kinds[0].lower()}"
        if table not in self.tables:
            self.tables.add(self.weight(table, blocks.raw))
        return table

    def block_matmul(self, x: str, name: str, blocks: Blocks) -> str:
        """MatMulNBits on blocks without offsets, as they are."""
        rows, cols = blocks.shape  # [N, K]
        return self.op(
            "MatMulNBits",
            x,
            self.weight(f"{name}.qweight", blocks.packed()),
            self.weight(f"{name}.scales", blocks.scales.reshape(-1)),  # no zero points: the default, 2^(bits-1)
            domain="com.microsoft",
            K=cols,
            N=rows,
            bits=blocks.bits,
            block_size=blocks.block_size,
            accuracy_level=ACCURACY_LEVEL,
        )


@dataclass
class Prelude:
    """What every layer reads: the graph inputs and GroupQueryAttention's view of the mask."""

    past: list[str]  # past_key_values.{i}.key|value
    present: list[str]  # present.{i}.key|value
    seqlens_k: str  # [b] int32, tokens per row - 1
    total: str  # [] int32, the mask's length
    one_axis: str  # const [1]


def prelude(g: GraphBuilder, num_layers: int) -> Prelude:
    with g.scope("mask"):
        one_axis = g.const([1])
        lengths = g.op("ReduceSum", graph_io.ATTENTION_MASK, one_axis, keepdims=0)  # [b]
        seqlens_k = g.op("Cast", g.op("Sub", lengths, g.const(1)), to=TensorProto.INT32)  # [b]
        mask_shape = g.op("Shape", graph_io.ATTENTION_MASK)
        total = g.op("Cast", g.op("Gather", mask_shape, g.const(1), axis=0), to=TensorProto.INT32)  # []
    return Prelude(graph_io.past_names(num_layers), graph_io.present_names(num_layers), seqlens_k, total, one_axis)


# --- steering: the same residual add after every layer of every family ------------------------------


class Steering:
    """The steering input split per layer, and the residual add that ends every layer (steered or not)."""

    def __init__(self, g: GraphBuilder, spec: GraphSpec, steered_layers: list[int]) -> None:
        self.steered = set(steered_layers)
        self.custom_kernels = g.custom_kernels
        if not steered_layers:
            return
        with g.scope("steering"):  # one Split for all layers: shifts[i] = steering[:, i:i+1] [b, 1, hidden]
            split = g.op("Split", graph_io.STEERING, outputs=spec.num_layers, axis=1, num_outputs=spec.num_layers)
        self.shifts = [split] if spec.num_layers == 1 else split
        if not g.custom_kernels:  # SteeredAdd needs none
            self.ones = g.weight("steer.ones", np.ones(spec.hidden, np.float32))  # [hidden], the unit norm scale

    def residual_add(self, g: GraphBuilder, h: str, delta: str, layer: int) -> str:
        """h + delta, steered after the layers it steers: llama.cpp's build_cvec(cur, il)."""
        if layer not in self.steered:
            with g.scope("residual"):
                return g.op("Add", h, delta)
        with g.scope("steer"):
            return self.steered_add(g, h, delta, self.shifts[layer])

    # The steered residual add of layer l (r: the residual stream after the layer, s_l = steering[:, l]):
    #
    #   h ─────┐
    #          ▼
    #   delta ─► SkipSimplifiedLayerNorm(scale 1) ──► r = h + delta ──► Add ◄── s_l
    #                       │                                            │
    #                       ▼                                            ▼ r + s_l
    #                  1 / rms(r)                         SimplifiedLayerNorm(scale 1)
    #                       │                                            │ (r + s_l) / rms(r + s_l)
    #                       └────────────────────────► Div ◄─────────────┘
    #                                                   │
    #                                                   ▼ h' = (r + s_l) * ||r|| / ||r + s_l||
    #
    # (the sqrt(hidden) in both RMS cancel). With custom kernels all of it is one SteeredAdd(h, delta, s_l).
    # Decode steps run hundreds of small kernels, each costing microseconds, so the count matters: this is 4
    # where Add, Add, LpNormalization, ReduceL2, Mul were 5.
    def steered_add(self, g: GraphBuilder, h: str, delta: str, shift: str) -> str:
        """h + delta, then steered per token: (h + s) * ||h|| / ||h + s||, s = shift [b, 1, hidden]."""
        if self.custom_kernels:
            return g.op("SteeredAdd", h, delta, shift, domain=kernels.DOMAIN, epsilon=STEER_EPSILON)
        _, _, inverse_rms, total = g.op(
            "SkipSimplifiedLayerNormalization",
            h,
            delta,
            self.ones,
            outputs=[None, "", None, None],
            domain="com.microsoft",
            epsilon=STEER_EPSILON,
        )  # [b, s, 1] 1/rms(h), [b, s, hidden] h
        steered = g.op("Add", total, shift)  # [b, s, hidden]; the skip input of the kernel above cannot broadcast
        unit = g.op("SimplifiedLayerNormalization", steered, self.ones, axis=-1, epsilon=STEER_EPSILON)
        return g.op("Div", unit, inverse_rms)


# --- block builders ---------------------------------------------------------------------------------


def norm_scale(g: GraphBuilder, spec: GraphSpec, module, name: str) -> str:
    weight = array(module.weight)
    return g.weight(f"{name}.weight", weight + spec.norm_offset if spec.norm_offset else weight)


def norm(g: GraphBuilder, spec: GraphSpec, x: str, module, name: str) -> str:
    """The family's norm over the last axis of x."""
    with g.part(name):
        scale = norm_scale(g, spec, module, name)
        if spec.norm == "rms":
            return g.op("SimplifiedLayerNormalization", x, scale, axis=-1, epsilon=spec.norm_eps)
        shift = g.weight(f"{name}.bias", array(module.bias))
        return g.op("LayerNormalization", x, scale, shift, axis=-1, epsilon=spec.norm_eps)


def add_then_norm(g: GraphBuilder, spec: GraphSpec, h: str, delta: str, module, name: str) -> tuple[str, str]:
    """(norm(h + delta), h + delta) in one Skip[Simplified]LayerNormalization kernel."""
    with g.part(name):
        scale = norm_scale(g, spec, module, name)
        if spec.norm == "rms":
            kind, extra = "SkipSimplifiedLayerNormalization", []
        else:
            kind, extra = "SkipLayerNormalization", [g.weight(f"{name}.bias", array(module.bias))]
        normed, _, _, total = g.op(
            kind, h, delta, scale, *extra, outputs=[None, "", "", None], domain="com.microsoft", epsilon=spec.norm_eps
        )  # mean and inverse std are not needed
        return normed, total


def token_embedding(g: GraphBuilder, spec: GraphSpec, table_module, name: str) -> tuple[str, str]:
    """(the embeddings [b, s, hidden] of input_ids, the name of the float table or "")."""
    with g.part(name):
        if spec.tied_head and "lm_head" not in g.blocks and g.quantizer is not None:
            made = g.quantizer("lm_head", array(table_module.weight))  # [vocab, hidden], the head's weight
            if made is not None:  # the head's linear takes the same blocks
                g.made["lm_head"] = made
        table_name = "lm_head" if spec.tied_head else "embedding"  # a tied table is the head's weight
        table_blocks = g.made.get(table_name) or g.blocks.get(table_name)
        if g.custom_kernels and table_blocks is not None and fits_raw_kernel(table_blocks):
            vocab, hidden = table_blocks.shape  # the table is the GGUF's bytes, rows dequantized as looked up
            table = g.gguf_table(table_name, table_blocks)
            kind = table_blocks.kinds[0]
            h = g.op(f"{kind}Gather", table, graph_io.INPUT_IDS, domain=kernels.DOMAIN, K=hidden, N=vocab)  # [b, s, h]
            table = ""
        elif table_blocks is not None and table_blocks.offsets is None:
            # the table's own blocks, looked up quantized, with no float32 copy of it
            vocab = table_blocks.shape[0]
            table = g.weight(f"{name}.qweight", table_blocks.packed().reshape(vocab, -1))  # [vocab, hidden*bits/8]
            scales = g.weight(f"{name}.scales", table_blocks.scales)  # [vocab, hidden/block_size]
            h = g.op(
                "GatherBlockQuantized",
                table,
                graph_io.INPUT_IDS,
                scales,
                domain="com.microsoft",
                bits=table_blocks.bits,
                block_size=table_blocks.block_size,
                gather_axis=0,
                quantize_axis=1,
            )  # [b, s, hidden], (q - 2^(bits-1)) * scale: the default zero point, as in MatMulNBits
            table = ""
        else:
            table = g.weight(f"{name}.weight", array(table_module.weight))  # [vocab, hidden]
            h = g.op("Gather", table, graph_io.INPUT_IDS, axis=0)  # [b, s, hidden]
        if spec.embedding_scale != 1.0:
            h = g.op("Mul", h, g.const(spec.embedding_scale, np.float32))
        return h, table


def rope_inputs(g: GraphBuilder, model, spec: GraphSpec) -> dict[str, list[str]]:
    """rope table name -> [cos, sin] initializers, GroupQueryAttention's cos_cache and sin_cache."""
    tables = rope_tables(model, spec)
    if set(tables) == {"default"}:
        cos, sin = tables["default"]
        return {"default": [g.weight("rope.cos", cos), g.weight("rope.sin", sin)]}
    return {n: [g.weight(f"rope.{n}.cos", cos), g.weight(f"rope.{n}.sin", sin)] for n, (cos, sin) in tables.items()}


def attention(
    g: GraphBuilder,
    spec: GraphSpec,
    pre: Prelude,
    layer: int,
    x: str,
    qkv: tuple[str, Linear],
    out: tuple[str, Linear],
    rope: list[str],
    qk_norms: tuple | None = None,
) -> str:
    """Self-attention of layer `layer` on x [b, s, hidden]: the q|k|v projection, q/k norms per head when
    given, GroupQueryAttention (rope, window, soft-cap, KV cache) and the output projection."""
    with g.scope("attn"):
        packed = g.linear(x, qkv[0], *qkv[1])  # [b, s, (H + 2 KV) d]
        query, key, value = packed, "", ""
        if qk_norms is not None:  # per head: Reshape -> SimplifiedLayerNormalization -> Reshape
            sizes = g.const([spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.kv_heads * spec.head_dim])
            query, key, value = g.op("Split", packed, sizes, outputs=3, axis=-1)
            per_head, flat = g.const([0, 0, -1, spec.head_dim]), g.const([0, 0, -1])
            query, key = (
                g.op("Reshape", norm(g, spec, g.op("Reshape", t, per_head), module, name), flat)
                for t, (module, name) in zip((query, key), qk_norms, strict=True)
            )  # [b, s, H d], [b, s, KV d]
        settings = dict(num_heads=spec.heads, kv_num_heads=spec.kv_heads, scale=spec.attention_scale)
        if rope[0]:
            settings.update(do_rotary=1, rotary_interleaved=0)
        if spec.windows[layer]:  # the same keys as transformers' sliding mask (checked in tests/test_families.py)
            settings["local_window_size"] = spec.windows[layer]
        if spec.attention_softcap:
            settings["softcap"] = spec.attention_softcap
        # CachedAttention: GroupQueryAttention's contract with a decode step of its own
        op, domain = ("GroupQueryAttention", "com.microsoft")
        if g.cached_attention:
            op, domain = "CachedAttention", kernels.DOMAIN
        context, _, _ = g.op(
            op,
            query,
            key,
            value,
            pre.past[2 * layer],
            pre.past[2 * layer + 1],
            pre.seqlens_k,
            pre.total,
            *rope,
            outputs=[None, pre.present[2 * layer], pre.present[2 * layer + 1]],
            domain=domain,
            **settings,
        )  # [b, s, H*d], [b, KV, total, d] x2
        return g.linear(context, out[0], *out[1])


def gated_mlp(g: GraphBuilder, spec: GraphSpec, x: str, gate_up: tuple[str, Linear], down: tuple[str, Linear]) -> str:
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu-tanh), gate|up in one MatMul (in one kernel
    with the activation, where grains-edge's kernels take its blocks)."""
    with g.scope("mlp"):
        return g.linear(g.linear(x, gate_up[0], *gate_up[1], activation=spec.activation), down[0], *down[1])


def head(g: GraphBuilder, spec: GraphSpec, pre: Prelude, model, h: str, final_norm, table: str, separate: bool):
    """The final norm and the LM head on the last logits_to_keep positions of h, into the `logits` output;
    `separate`: the head gets its own [hidden, vocab] MatMul weight even when tied, so a quantizer can take it."""
    with g.scope("head"):
        keep = g.op("Neg", graph_io.LOGITS_TO_KEEP)
        kept = g.op("Slice", h, keep, g.const([np.iinfo(np.int64).max]), pre.one_axis)  # [b, k, hidden]
    x = norm(g, spec, kept, final_norm, "final_norm")
    weight = model.get_output_embeddings().weight
    with g.scope("head"):
        flat = g.op("Reshape", x, g.const([-1, spec.hidden]))  # [b*k, hidden]
    if separate or "lm_head" in g.blocks or "lm_head" in g.made:
        logits = g.linear(flat, "lm_head", array(weight).T, None)  # [b*k, vocab]
    else:  # the tied embedding table read in place, no transposed copy
        with g.scope("lm_head"):
            head_table = table if spec.tied_head else g.weight("lm_head.weight", array(weight))  # [vocab, hidden]
            logits = g.op("Gemm", flat, head_table, transB=1)  # [b*k, vocab]
    with g.scope("head"):
        if spec.final_softcap:  # c * tanh(logits / c)
            cap = g.const(spec.final_softcap, np.float32)
            logits = g.op("Mul", g.op("Tanh", g.op("Div", logits, cap)), cap)
        batch_seq = g.op("Slice", g.op("Shape", kept), g.const([0]), g.const([2]))
        shape = g.op("Concat", batch_seq, g.const([-1]), axis=0)
        g.op("Reshape", logits, shape, outputs=[graph_io.LOGITS])  # [b, k, vocab]


# --- one function per family -------------------------------------------------------------------------


def llama_attention(g: GraphBuilder, spec: GraphSpec, pre: Prelude, rope: dict, i: int, layer, x: str) -> str:
    """The attention block of a Llama-style layer (Gemma's too): q|k|v side by side, or as Phi-3's checkpoint
    has them fused already; q and k normed per head where the family does it."""
    attn = layer.self_attn
    parts = (attn.qkv_proj,) if spec.family == "phi3" else (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv, out = (f"layers.{i}.qkv", side_by_side(*parts)), (f"layers.{i}.o_proj", side_by_side(attn.o_proj))
    qk_norms = ((attn.q_norm, f"layers.{i}.q_norm"), (attn.k_norm, f"layers.{i}.k_norm")) if spec.qk_norm else None
    return attention(g, spec, pre, i, x, qkv, out, rope[spec.rope[i]], qk_norms)


def llama_mlp(g: GraphBuilder, spec: GraphSpec, i: int, layer, x: str) -> str:
    """The gated MLP of a Llama-style layer: gate|up side by side, or as Phi-3's checkpoint has them fused."""
    mlp = layer.mlp
    parts = (mlp.gate_up_proj,) if spec.family == "phi3" else (mlp.gate_proj, mlp.up_proj)
    gate_up, down = (
        (f"layers.{i}.gate_up", side_by_side(*parts)),
        (f"layers.{i}.down_proj", side_by_side(mlp.down_proj)),
    )
    return gated_mlp(g, spec, x, gate_up, down)


def llama_decoder(g: GraphBuilder, spec: GraphSpec, model, pre: Prelude, steering: Steering, separate: bool) -> None:
    """Llama, Mistral, Qwen2, Qwen3, Phi-3: h += attn(norm(h)); h += mlp(norm(h)); steer."""
    body = decoder_body(model)
    h, table = token_embedding(g, spec, body.embed_tokens, "embed_tokens")
    rope = rope_inputs(g, model, spec)
    for i, layer in enumerate(body.layers):
        with g.scope(f"layers.{i}"):
            x = norm(g, spec, h, layer.input_layernorm, f"layers.{i}.input_norm")
            attended = llama_attention(g, spec, pre, rope, i, layer, x)
            x, h = add_then_norm(g, spec, h, attended, layer.post_attention_layernorm, f"layers.{i}.post_norm")
            h = steering.residual_add(g, h, llama_mlp(g, spec, i, layer, x), i)  # [b, s, hidden]
    head(g, spec, pre, model, h, body.norm, table, separate)


def gemma_decoder(g: GraphBuilder, spec: GraphSpec, model, pre: Prelude, steering: Steering, separate: bool) -> None:
    """Gemma-2, Gemma-3, norms before and after each block: h += norm(attn(norm(h))); h += norm(mlp(norm(h)));
    steer."""
    body = decoder_body(model)
    h, table = token_embedding(g, spec, body.embed_tokens, "embed_tokens")
    rope = rope_inputs(g, model, spec)
    for i, layer in enumerate(body.layers):
        with g.scope(f"layers.{i}"):
            x = norm(g, spec, h, layer.input_layernorm, f"layers.{i}.input_norm")
            attended = llama_attention(g, spec, pre, rope, i, layer, x)
            attended = norm(g, spec, attended, layer.post_attention_layernorm, f"layers.{i}.post_attention_norm")
            x, h = add_then_norm(g, spec, h, attended, layer.pre_feedforward_layernorm, f"layers.{i}.pre_mlp_norm")
            delta = llama_mlp(g, spec, i, layer, x)
            delta = norm(g, spec, delta, layer.post_feedforward_layernorm, f"layers.{i}.post_mlp_norm")
            h = steering.residual_add(g, h, delta, i)  # [b, s, hidden]
    head(g, spec, pre, model, h, body.norm, table, separate)


def gpt2_decoder(g: GraphBuilder, spec: GraphSpec, model, pre: Prelude, steering: Steering, separate: bool) -> None:
    """GPT-2: learned positions; x = ln_1(h); h += attn(x); h += mlp(ln_2(h)); steer. Its Conv1D weights
    are [in, out] already."""
    body = model.transformer
    with g.scope("wte"):
        table = g.weight("wte.weight", array(body.wte.weight))
        positions = g.weight("wpe.weight", array(body.wpe.weight))
        tokens = g.op("Gather", table, graph_io.INPUT_IDS, axis=0)
        h = g.op("Add", tokens, g.op("Gather", positions, graph_io.POSITION_IDS, axis=0))  # [b, s, hidden]
    for i, layer in enumerate(body.h):
        attn, mlp = layer.attn, layer.mlp
        with g.scope(f"layers.{i}"):
            x = norm(g, spec, h, layer.ln_1, f"h.{i}.ln_1")
            qkv = (f"h.{i}.c_attn", (array(attn.c_attn.weight), array(attn.c_attn.bias)))
            out = (f"layers.{i}.o_proj", (array(attn.c_proj.weight), array(attn.c_proj.bias)))
            attended = attention(g, spec, pre, i, x, qkv, out, ["", ""])
            x, h = add_then_norm(g, spec, h, attended, layer.ln_2, f"h.{i}.ln_2")
            with g.scope("mlp"):
                fc = g.linear(x, f"h.{i}.c_fc", array(mlp.c_fc.weight), array(mlp.c_fc.bias))
                act = g.op("Gelu", fc, approximate="tanh")
                delta = g.linear(act, f"h.{i}.mlp.c_proj", array(mlp.c_proj.weight), array(mlp.c_proj.bias))
            h = steering.residual_add(g, h, delta, i)  # [b, s, hidden]
    head(g, spec, pre, model, h, body.ln_f, table, separate)


# model_type -> the function that builds its layers; a new family is a GraphSpec derivation and an entry here
FAMILIES: dict[str, Callable] = {
    "llama": llama_decoder,
    "mistral": llama_decoder,
    "qwen2": llama_decoder,
    "qwen3": llama_decoder,
    "phi3": llama_decoder,
    "gemma2": gemma_decoder,
    "gemma3_text": gemma_decoder,
    "gpt2": gpt2_decoder,
}


def build(
    model,
    spec: GraphSpec,
    steered_layers: list[int],
    separate_head: bool = False,
    blocks: Mapping[str, Blocks] | None = None,
    custom_kernels: bool = False,
    weights_file: Path | None = None,
    quantizer: Quantizer | None = None,
    taken: Callable[[Blocks], None] | None = None,
) -> onnx.ModelProto:
    """The steered graph of `model` (a loaded HF causal LM of a FAMILIES type) as `spec` describes it.
    `separate_head` gives the LM head its own [hidden, vocab] MatMul weight even when tied, so a quantizer can
    take it; `blocks` replaces the named linears (and `lm_head`) with MatMulNBits on already-quantized weights,
    or their Q4_0, Q4_1, Q4_K and Q6_K ones with grains-edge's kernels when `custom_kernels`, which also steers
    with SteeredAdd.
    With `weights_file` (the graph's model.onnx.data) each weight is written there as it is made and the
    graph holds a reference to it; `quantizer` makes the blocks of the other linears as they are added; `taken`
    is called with each of `blocks` as the graph takes it."""
    with WeightsFile(weights_file) if weights_file else contextlib.nullcontext() as sink:
        g = GraphBuilder(blocks, custom_kernels, sink, quantizer, taken)
        pre = prelude(g, spec.num_layers)
        steering = Steering(g, spec, steered_layers)
        FAMILIES[spec.family](g, spec, model, pre, steering, separate_head)

    float_t, int_t = TensorProto.FLOAT, TensorProto.INT64
    cache = ["batch", spec.kv_heads, "past", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info(graph_io.INPUT_IDS, int_t, ["batch", "seq"]),
        helper.make_tensor_value_info(graph_io.ATTENTION_MASK, int_t, ["batch", "total"]),
        helper.make_tensor_value_info(graph_io.POSITION_IDS, int_t, ["batch", "seq"]),
        helper.make_tensor_value_info(graph_io.STEERING, float_t, ["batch", spec.num_layers, spec.hidden]),
        helper.make_tensor_value_info(graph_io.LOGITS_TO_KEEP, int_t, [1]),
        *[helper.make_tensor_value_info(name, float_t, cache) for name in pre.past],
    ]
    outputs = [
        helper.make_tensor_value_info(graph_io.LOGITS, float_t, ["batch", "kept", spec.vocab_size]),
        *[
            helper.make_tensor_value_info(n, float_t, ["batch", spec.kv_heads, "present", spec.head_dim])
            for n in pre.present
        ],
    ]
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if any(node.domain == kernels.DOMAIN for node in g.nodes):
        opsets.append(helper.make_opsetid(kernels.DOMAIN, 1))
    graph = helper.make_graph(g.nodes, "grains_edge_steered_decoder", inputs, outputs)
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="grains-edge")
    move_initializers(g.initializers, proto.graph)
    return proto


def move_initializers(tensors: list[onnx.TensorProto], graph: onnx.GraphProto) -> None:
    """Append `tensors` to the graph, emptying the list as it goes: protobuf copies each message it appends
    (make_graph did, and make_model copied the graph again), so this holds each weight once instead of thrice."""
    tensors.reverse()
    while tensors:
        graph.initializer.append(tensors.pop())
