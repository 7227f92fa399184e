"""Build the steered ONNX graph of a Llama- or GPT-2-family causal LM directly from its weights.

One readable pass, layer by layer, in the ops ONNX Runtime runs fastest on a CPU:
SimplifiedLayerNormalization / LayerNormalization, one MatMul for q|k|v and one for gate|up, and
`com.microsoft.GroupQueryAttention` (RoPE, causal mask, grouped KV heads and the KV cache in one
kernel; its past and present buffers may be the same memory, so decoding appends in place). After
every steered layer, per token, the GRAINS renormalization

    h' = (h + s_l) * ||h|| / ||h + s_l||        s_l = steering[:, l:l+1, :] (one Split for all l)

in four kernels that also do the layer's residual add: SkipSimplifiedLayerNormalization(h, delta) with
unit scale outputs h and 1/rms(h); Add and SimplifiedLayerNormalization give (h + s_l) / rms(h + s_l);
a Div by the first 1/rms finishes it (the sqrt(hidden) in the two RMS cancel). Decode steps run
hundreds of small kernels, each costing microseconds, so the count matters: this is 4 where Add, Add,
LpNormalization, ReduceL2, Mul were 5.

Graph interface:
  inputs   input_ids [b, s] int64, attention_mask [b, total] int64 (1 = token, right padding only),
           position_ids [b, s] int64, steering [b, num_layers, hidden] float32,
           logits_to_keep [1] int64 (k: logits of the last k positions only; 0 = all, as scoring needs;
           a prompt step needs only the last, and for 512 prompt tokens the LM head is otherwise the
           largest matmul of the step and its logits 100 MB),
           past_key_values.{i}.key|value [b, kv_heads, past, head_dim] float32
  outputs  logits [b, k, vocab] (the last k = logits_to_keep positions, or all s),
           present.{i}.key|value [b, kv_heads, total or buffer, head_dim]
The causal mask and positions come from attention_mask (seqlens_k = sum(mask) - 1, as
GroupQueryAttention defines them); position_ids feed GPT-2's learned position table.

Sources: Llama (Touvron et al. 2023) and GPT-2 (Radford et al. 2019) as in transformers'
`modeling_llama.py` / `modeling_gpt2.py`; RoPE (Su et al. 2021); ONNX Runtime contrib op docs
(`GroupQueryAttention`, `SimplifiedLayerNormalization`).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from grains_edge import kernels
from grains_edge.export.gguf_blocks import BLOCK, Blocks, block_sum_indicator, folded, q4_1_fields

OPSET = 20
# MatMulNBits accuracy level 4: int8 activations inside the kernel, like llama.cpp's q8 dot products; the
# fast path on x86 (level 1, float32 activations, is exact but 4-8x slower per decode step).
ACCURACY_LEVEL = 4
# The eps under the RMS of the steering renormalization: far below any hidden state's mean square, so the
# result is (h + s) * ||h|| / ||h + s|| to float precision, and 0 (not NaN) where h + s = 0.
STEER_EPSILON = 1e-12


def array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


class GraphBuilder:
    """Accumulates nodes and initializers; `op` returns the output name(s) of the node it adds.
    `blocks`: weights (by linear name) already quantized, e.g. a GGUF's own (`gguf_blocks.py`);
    `own_kernels`: Q4_1 blocks and the steering go to grains-edge's own kernels (grains_edge/kernels)."""

    def __init__(self, blocks: dict[str, Blocks] | None = None, own_kernels: bool = False) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.blocks = blocks or {}
        self.own_kernels = own_kernels

    def weight(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        self.count += 1
        return self.weight(f"const_{self.count}", np.asarray(value, dtype))

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attributes):
        self.count += 1
        names = [f"{op_type.lower()}_{self.count}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain, **attributes))
        return names[0] if outputs == 1 else names

    def linear(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        """x @ weight (+ bias); weight is [in, out]; from self.blocks[name] when it has them."""
        blocks = self.blocks.get(name)
        if blocks is None:
            y = self.op("MatMul", x, self.weight(f"{name}.weight", weight))
        elif blocks.offsets is None:
            y = self.block_matmul(x, name, blocks)
        elif self.own_kernels:
            rows, cols = blocks.shape  # [N, K]
            fields = [self.weight(f"{name}.{f}", v) for f, v in zip("qdm", q4_1_fields(blocks), strict=True)]
            y = self.op("Q4_1MatMul", x, *fields, domain=kernels.DOMAIN, K=cols, N=rows)
        else:  # Q4_1: the offsets ride as extra K columns fed by x's block sums (gguf_blocks.folded)
            sums = self.block_matmul(x, f"{name}.block_sums", block_sum_indicator(blocks.shape[1]))
            y = self.block_matmul(self.op("Concat", x, sums, axis=-1), name, folded(blocks))
        return y if bias is None else self.op("Add", y, self.weight(f"{name}.bias", bias))

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
            block_size=BLOCK,
            accuracy_level=ACCURACY_LEVEL,
        )


def fused(*linears) -> tuple[np.ndarray, np.ndarray | None]:
    """[in, sum of outs] weights (and biases) of nn.Linear layers side by side."""
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


def rope_caches(model, max_positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_positions, head_dim / 2] from the model's own rotary module (any rope scaling)."""
    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.float32)
    angles = positions[:, None] * rotary.inv_freq.float()[None, :]  # [positions, d/2]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return array(angles.cos() * scale), array(angles.sin() * scale)


def build(
    model,
    steered_layers: list[int],
    input_names: list[str],
    output_names: list[str],
    separate_head: bool = False,
    blocks: dict[str, Blocks] | None = None,
    own_kernels: bool = False,
) -> onnx.ModelProto:
    """The steered graph of `model` (a loaded HF LlamaForCausalLM or GPT2LMHeadModel). `separate_head`
    gives the LM head its own [hidden, vocab] MatMul weight even when tied, so a quantizer can take it;
    `blocks` replaces the named linears (and `lm_head`) with MatMulNBits on already-quantized weights, or
    their Q4_1 ones with grains-edge's Q4_1MatMul when `own_kernels`, which also steers with SteeredAdd."""
    config = model.config
    llama = config.model_type == "llama"
    num_layers, hidden = config.num_hidden_layers, config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    max_positions = int(getattr(config, "max_position_embeddings", 0) or config.n_positions)
    g = GraphBuilder(blocks, own_kernels)
    ids, mask, positions, steering, keep = input_names[:5]
    past = input_names[5:]

    # prelude: GroupQueryAttention's view of the mask, the embeddings
    one_axis = g.const([1])
    lengths = g.op("ReduceSum", mask, one_axis, keepdims=0)  # [b]
    seqlens_k = g.op("Cast", g.op("Sub", lengths, g.const(1)), to=TensorProto.INT32)  # [b]
    total = g.op("Cast", g.op("Gather", g.op("Shape", mask), g.const(1), axis=0), to=TensorProto.INT32)  # []
    if steered_layers:  # one Split for all layers: shifts[i] = steering[:, i:i+1] [b, 1, hidden]
        split = g.op("Split", steering, outputs=num_layers, axis=1, num_outputs=num_layers)
        shifts = [split] if num_layers == 1 else split
        if not own_kernels:  # SteeredAdd needs none
            ones = g.weight("steer.ones", np.ones(hidden, np.float32))  # [hidden], the unit norm scale
    attention = dict(domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim**-0.5))
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if llama:
        body = model.model
        head_blocks = g.blocks.get("lm_head")
        if tied and head_blocks is not None and head_blocks.offsets is None:
            # the table is the head's own blocks: looked up quantized, with no float32 copy of it
            vocab = head_blocks.shape[0]
            table = g.weight("embed_tokens.qweight", head_blocks.packed().reshape(vocab, -1))  # [vocab, hidden*bits/8]
            scales = g.weight("embed_tokens.scales", head_blocks.scales)  # [vocab, hidden/32]
            h = g.op(
                "GatherBlockQuantized",
                table,
                ids,
                scales,
                domain="com.microsoft",
                bits=head_blocks.bits,
                block_size=BLOCK,
                gather_axis=0,
                quantize_axis=1,
            )  # [b, s, hidden], (q - 2^(bits-1)) * scale: the default zero point, as in MatMulNBits
        else:
            embedding = g.weight("embed_tokens.weight", array(body.embed_tokens.weight))  # [vocab, hidden]
            h = g.op("Gather", embedding, ids, axis=0)  # [b, s, hidden]
        cos, sin = rope_caches(model, max_positions, head_dim)
        rope = [g.weight("rope.cos", cos), g.weight("rope.sin", sin)]
        attention.update(do_rotary=1, rotary_interleaved=0)
        blocks = body.layers
    else:
        body = model.transformer
        embedding = g.weight("wte.weight", array(body.wte.weight))
        table = g.weight("wpe.weight", array(body.wpe.weight))
        h = g.op("Add", g.op("Gather", embedding, ids, axis=0), g.op("Gather", table, positions, axis=0))
        rope = ["", ""]
        blocks = body.h

    def norm(x: str, module, name: str) -> str:
        scale = g.weight(f"{name}.weight", array(module.weight))
        if llama:
            return g.op("SimplifiedLayerNormalization", x, scale, axis=-1, epsilon=float(module.variance_epsilon))
        shift = g.weight(f"{name}.bias", array(module.bias))
        return g.op("LayerNormalization", x, scale, shift, axis=-1, epsilon=float(module.eps))

    def add_then_norm(h: str, delta: str, module, name: str) -> tuple[str, str]:
        """(norm(h + delta), h + delta) in one Skip[Simplified]LayerNormalization kernel."""
        scale = g.weight(f"{name}.weight", array(module.weight))
        if llama:
            eps_value, kind, extra = float(module.variance_epsilon), "SkipSimplifiedLayerNormalization", []
        else:
            eps_value, kind, extra = (
                float(module.eps),
                "SkipLayerNormalization",
                [g.weight(f"{name}.bias", array(module.bias))],
            )
        normed, _, _, total = g.op(kind, h, delta, scale, *extra, outputs=4, domain="com.microsoft", epsilon=eps_value)
        g.nodes[-1].output[1:3] = ["", ""]  # mean and inverse std are not needed
        return normed, total

    def steer(h: str, delta: str, shift: str) -> str:
        """h + delta, then steered: (h + s) * ||h|| / ||h + s|| per token (the module docstring)."""
        if own_kernels:
            return g.op("SteeredAdd", h, delta, shift, domain=kernels.DOMAIN, epsilon=STEER_EPSILON)
        _, _, inverse_rms, total = g.op(
            "SkipSimplifiedLayerNormalization", h, delta, ones, outputs=4, domain="com.microsoft", epsilon=STEER_EPSILON
        )  # [b, s, 1] 1/rms(h), [b, s, hidden] h
        g.nodes[-1].output[1] = ""
        steered = g.op("Add", total, shift)  # [b, s, hidden]; the skip input of the kernel above cannot broadcast
        unit = g.op("SimplifiedLayerNormalization", steered, ones, axis=-1, epsilon=STEER_EPSILON)  # (h+s)/rms(h+s)
        return g.op("Div", unit, inverse_rms)

    for i, block in enumerate(blocks):
        past_k, past_v = past[2 * i], past[2 * i + 1]
        if llama:
            attn, mlp = block.self_attn, block.mlp
            x = norm(h, block.input_layernorm, f"layers.{i}.input_norm")
            qkv = g.linear(x, f"layers.{i}.qkv", *fused(attn.q_proj, attn.k_proj, attn.v_proj))  # [b, s, (H+2KV)d]
            out_proj = (
                array(attn.o_proj.weight).T,
                None if attn.o_proj.bias is None else array(attn.o_proj.bias),
            )
        else:
            attn, mlp = block.attn, block.mlp
            x = norm(h, block.ln_1, f"h.{i}.ln_1")
            qkv = g.linear(x, f"h.{i}.c_attn", array(attn.c_attn.weight), array(attn.c_attn.bias))
            out_proj = (array(attn.c_proj.weight), array(attn.c_proj.bias))
        context, present_k, present_v = g.op(
            "GroupQueryAttention",
            qkv,
            "",
            "",
            past_k,
            past_v,
            seqlens_k,
            total,
            *rope,
            outputs=3,
            **attention,
        )  # [b, s, H*d], [b, KV, total, d] x2
        g.nodes[-1].output[1:] = [output_names[1 + 2 * i], output_names[2 + 2 * i]]
        attended = g.linear(context, f"layers.{i}.o_proj", *out_proj)
        if llama:
            x, h = add_then_norm(h, attended, block.post_attention_layernorm, f"layers.{i}.post_norm")
            gate, up = g.op(
                "Split",
                g.linear(x, f"layers.{i}.gate_up", *fused(mlp.gate_proj, mlp.up_proj)),
                outputs=2,
                axis=-1,
                num_outputs=2,
            )
            act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)  # silu(gate) * up
            down = (array(mlp.down_proj.weight).T, None if mlp.down_proj.bias is None else array(mlp.down_proj.bias))
            delta = g.linear(act, f"layers.{i}.down_proj", *down)
        else:
            x, h = add_then_norm(h, attended, block.ln_2, f"h.{i}.ln_2")
            fc = g.linear(x, f"h.{i}.c_fc", array(mlp.c_fc.weight), array(mlp.c_fc.bias))
            act = g.op("Gelu", fc, approximate="tanh")
            delta = g.linear(act, f"h.{i}.mlp.c_proj", array(mlp.c_proj.weight), array(mlp.c_proj.bias))
        h = steer(h, delta, shifts[i]) if i in steered_layers else g.op("Add", h, delta)  # [b, s, hidden]

    final = body.norm if llama else body.ln_f
    kept = g.op("Slice", h, g.op("Neg", keep), g.const([np.iinfo(np.int64).max]), one_axis)  # [b, k, hidden]
    x = norm(kept, final, "final_norm")
    flat = g.op("Reshape", x, g.const([-1, hidden]))  # [b*k, hidden]
    if separate_head or "lm_head" in g.blocks:
        logits = g.linear(flat, "lm_head", array(head).T, None)  # [b*k, vocab]
    else:  # the tied embedding table read in place, no transposed copy
        head_name = embedding if tied else g.weight("lm_head.weight", array(head))  # [vocab, hidden]
        logits = g.op("Gemm", flat, head_name, transB=1)  # [b*k, vocab]
    batch_seq = g.op("Slice", g.op("Shape", kept), g.const([0]), g.const([2]))
    g.nodes.append(
        helper.make_node("Reshape", [logits, g.op("Concat", batch_seq, g.const([-1]), axis=0)], [output_names[0]])
    )

    float_t, int_t = TensorProto.FLOAT, TensorProto.INT64
    cache = ["batch", kv_heads, "past", head_dim]
    inputs = [
        helper.make_tensor_value_info(ids, int_t, ["batch", "seq"]),
        helper.make_tensor_value_info(mask, int_t, ["batch", "total"]),
        helper.make_tensor_value_info(positions, int_t, ["batch", "seq"]),
        helper.make_tensor_value_info(steering, float_t, ["batch", num_layers, hidden]),
        helper.make_tensor_value_info(keep, int_t, [1]),
        *[helper.make_tensor_value_info(name, float_t, cache) for name in past],
    ]
    outputs = [
        helper.make_tensor_value_info(output_names[0], float_t, ["batch", "kept", config.vocab_size]),
        *[
            helper.make_tensor_value_info(n, float_t, ["batch", kv_heads, "present", head_dim])
            for n in output_names[1:]
        ],
    ]
    graph = helper.make_graph(g.nodes, "grains_edge_steered_decoder", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    if any(node.domain == kernels.DOMAIN for node in g.nodes):
        opsets.append(helper.make_opsetid(kernels.DOMAIN, 1))
    return helper.make_model(graph, opset_imports=opsets, producer_name="grains-edge")
