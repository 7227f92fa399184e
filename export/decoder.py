"""A compact causal decoder for export: Llama and GPT-2 families, KV cache, steering.

It reads the weights of a loaded Hugging Face model and recomputes its forward pass in a form
that exports cleanly to ONNX: flat KV-cache tensors, an explicit causal mask built from
`attention_mask`, grouped-query attention by broadcasting (no repeated K/V), and after every
steered layer the GRAINS renormalization (see `grains_edge.steering`).

Sources: Llama (Touvron et al. 2023; transformers `modeling_llama.py`), GPT-2 (Radford et al. 2019;
transformers `modeling_gpt2.py`), RoPE (Su et al. 2021). The parity test compares it to the
Hugging Face model with steering hooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from grains_edge.errors import GrainsError
from grains_edge.steering import renormalized_add


def fused_weight(*linears: nn.Linear) -> torch.Tensor:
    """[in, sum of outs]: the weights of bias-free Linear layers side by side, for one x @ W."""
    if any(linear.bias is not None for linear in linears):
        raise GrainsError("Llama-family models with attention or MLP biases are not supported yet")
    return torch.cat([linear.weight.detach().T for linear in linears], dim=1).contiguous()


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """R [dim, dim] with x @ R == cat(-x[dim/2:], x[:dim/2]) (the RoPE rotate-half as one MatMul)."""
    half = dim // 2
    rotate = torch.zeros(dim, dim)
    rotate[half:, :half] = -torch.eye(half)
    rotate[:half, half:] = torch.eye(half)
    return rotate


class SteeredDecoder(nn.Module):
    """forward(input_ids, attention_mask, position_ids, steering, *past) -> (logits, *present)."""

    def __init__(self, hf_model: nn.Module, steered_layers: Sequence[int]):
        super().__init__()
        config = hf_model.config
        self.arch = config.model_type
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.steered_layers = sorted(set(steered_layers))
        if self.arch == "llama":
            self.body = hf_model.model
            self.eps = config.rms_norm_eps
            rotary = self.body.rotary_emb
            self.register_buffer("inv_freq", rotary.inv_freq.float().clone(), persistent=False)
            self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
            self.register_buffer("rotate", rotate_half_matrix(self.head_dim), persistent=False)  # [d, d]
            # One MatMul for q|k|v and one for gate|up: fewer, larger kernels per decode step.
            self.qkv = [fused_weight(a.q_proj, a.k_proj, a.v_proj) for a in (l.self_attn for l in self.body.layers)]
            self.gate_up = [fused_weight(l.mlp.gate_proj, l.mlp.up_proj) for l in self.body.layers]
        else:
            self.body = hf_model.transformer
            self.eps = config.layer_norm_epsilon
        self.lm_head = hf_model.lm_head

    # ---- shared pieces -------------------------------------------------------------------

    def causal_bias(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """Additive mask [batch, 1, 1, seq, total] from attention_mask [batch, total]."""
        total = attention_mask.shape[1]
        query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)  # [seq]
        key_pos = torch.arange(total, device=attention_mask.device)  # [total]
        allowed = (key_pos[None, :] <= query_pos[:, None])[None] & attention_mask[:, None, :].bool()
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(allowed, zero, torch.finfo(torch.float32).min)[:, None, None]

    def attend(self, q, k, v, bias) -> torch.Tensor:
        """q [b, heads, seq, d], k/v [b, kv, total, d] -> [b, seq, heads*d] (GQA by broadcasting)."""
        b, _, seq, d = q.shape
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(b, self.num_kv_heads, group, seq, d)  # [b, kv, group, seq, d]
        scores = q @ k[:, :, None].transpose(-1, -2) / math.sqrt(d) + bias  # [b, kv, group, seq, total]
        out = scores.softmax(-1) @ v[:, :, None]  # [b, kv, group, seq, d]
        return out.reshape(b, self.num_heads, seq, d).transpose(1, 2).reshape(b, seq, self.num_heads * d)

    def split_heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, seq, _ = x.shape
        return x.view(b, seq, heads, self.head_dim).transpose(1, 2)  # [b, heads, seq, d]

    # ---- Llama -----------------------------------------------------------------------------

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # written as x / sqrt(...) so ONNX Runtime fuses it into SimplifiedLayerNormalization
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def llama_layer(self, index, layer, h, cos, sin, bias, past_k, past_v):
        attn, mlp = layer.self_attn, layer.mlp
        b, seq, _ = h.shape
        x = self.rms_norm(h, layer.input_layernorm.weight)
        heads = (x @ self.qkv[index]).view(b, seq, -1, self.head_dim).transpose(1, 2)  # [b, H+2KV, seq, d]
        rotary = self.num_heads + self.num_kv_heads
        qk = heads[:, :rotary]
        qk = qk * cos + (qk @ self.rotate) * sin  # RoPE on q and k together
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        k = torch.cat((past_k, k), dim=2)  # [b, kv, total, d]
        v = torch.cat((past_v, heads[:, rotary:]), dim=2)
        h = h + attn.o_proj(self.attend(q, k, v, bias))
        x = self.rms_norm(h, layer.post_attention_layernorm.weight)
        gate, up = (x @ self.gate_up[index]).chunk(2, dim=-1)
        h = h + mlp.down_proj(nn.functional.silu(gate) * up)
        return h, k, v

    # ---- GPT-2 -----------------------------------------------------------------------------

    def gpt2_layer(self, block, h, bias, past_k, past_v):
        x = nn.functional.layer_norm(h, h.shape[-1:], block.ln_1.weight, block.ln_1.bias, self.eps)
        q, k, v = block.attn.c_attn(x).split(h.shape[-1], dim=2)
        q = self.split_heads(q, self.num_heads)
        k = torch.cat((past_k, self.split_heads(k, self.num_heads)), dim=2)
        v = torch.cat((past_v, self.split_heads(v, self.num_heads)), dim=2)
        h = h + block.attn.c_proj(self.attend(q, k, v, bias))
        x = nn.functional.layer_norm(h, h.shape[-1:], block.ln_2.weight, block.ln_2.bias, self.eps)
        h = h + block.mlp.c_proj(nn.functional.gelu(block.mlp.c_fc(x), approximate="tanh"))
        return h, k, v

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, position_ids, steering, *past):
        """input_ids/position_ids [b, seq], attention_mask [b, past+seq], steering [b, layers, hidden],
        past = (k0, v0, k1, v1, ...) each [b, kv, past, d]. Returns logits [b, seq, vocab] and present."""
        seq = input_ids.shape[1]
        bias = self.causal_bias(attention_mask, seq)
        present = []
        if self.arch == "llama":
            h = self.body.embed_tokens(input_ids)  # [b, seq, hidden]
            freqs = position_ids[..., None].float() * self.inv_freq  # [b, seq, d/2]
            angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, seq, d]
            cos, sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale
            layers = self.body.layers
        else:
            h = self.body.wte(input_ids) + self.body.wpe(position_ids)
            layers = self.body.h
        for i, layer in enumerate(layers):
            past_k, past_v = past[2 * i], past[2 * i + 1]
            if self.arch == "llama":
                h, k, v = self.llama_layer(i, layer, h, cos, sin, bias, past_k, past_v)
            else:
                h, k, v = self.gpt2_layer(layer, h, bias, past_k, past_v)
            present += [k, v]
            if i in self.steered_layers:
                h = renormalized_add(h, steering[:, i])
        if self.arch == "llama":
            h = self.rms_norm(h, self.body.norm.weight)
        else:
            f = self.body.ln_f
            h = nn.functional.layer_norm(h, h.shape[-1:], f.weight, f.bias, self.eps)
        return (self.lm_head(h), *present)
