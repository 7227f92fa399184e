"""Norm-preserving steering, the reference PyTorch form.

GRAINS applies, after each steered decoder layer and per token,

    h' = (h + s) * ||h||_2 / max(||h + s||_2, eps)        (norm over the hidden axis)

The exported ONNX graph computes the same thing after every steered layer of every family
(export/graph.py, `Steering.residual_add`); this module is the PyTorch side: the formula, and forward
hooks that apply it to a Hugging Face model at the same points (used to verify exports, to benchmark
PyTorch eager, and to measure steered activations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

EPS = 1e-6


def renormalized_add(hidden: torch.Tensor, shift: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """hidden [batch, seq, hidden] + shift [batch, hidden], rescaled to keep each token's norm."""
    steered = hidden + shift[:, None, :]  # [batch, seq, hidden]
    scale = hidden.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(eps)
    return steered * scale


# Where each family keeps its decoder blocks: Llama, Mistral, Qwen2/3, Phi-3, Gemma-2/3 text models;
# Gemma-3 with its vision tower (the text model nested as language_model); GPT-2.
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h")


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder blocks of a supported causal LM, in order: each one's output is the residual stream
    after that layer, where the exported graph steers."""
    for path in LAYER_PATHS:
        found = model
        for part in path.split("."):
            found = getattr(found, part, None)
        if isinstance(found, torch.nn.ModuleList):
            return found
    raise TypeError(f"cannot find decoder layers in {type(model).__name__}")


@contextlib.contextmanager
def steering_hooks(
    model: torch.nn.Module, steering: torch.Tensor, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Apply steering [batch, num_layers, hidden] after each listed layer (all non-zero ones by default)."""
    blocks = decoder_layers(model)
    if layers is None:
        layers = [i for i in range(len(blocks)) if bool(steering[:, i].abs().sum() > 0)]

    def hook_for(index: int):
        def hook(_module, _args, output):
            if isinstance(output, tuple):
                return (renormalized_add(output[0], steering[:, index].to(output[0].dtype)), *output[1:])
            return renormalized_add(output, steering[:, index].to(output.dtype))

        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
