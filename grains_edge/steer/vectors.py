"""Steering vectors from contrastive pairs: GRAINS and the two standard baselines.

GRAINS (per pair): contrastive Integrated Gradients (`attribution.py`) scores every content token of
prompt+preferred and prompt+dispreferred by its push on f = log p(pref) - log p(dispref). The top-k
positive tokens of the preferred sequence and the top-k negative tokens of the dispreferred sequence are
masked, masking meaning their input embedding set to zero, the IG baseline, so a mask removes exactly
what the attribution measured (chat-template tokens score 0 and are never masked). Per layer, the change
of the last-token hidden state

    d+ = h(pref) - h(pref, positive tokens masked)      evidence for the preferred answer
    d- = h(dispref) - h(dispref, negative tokens masked) evidence for the dispreferred answer

is collected over pairs; v+ and v- are the first principal components (uncentred SVD: the dominant
direction, mean included; deterministic; sign chosen so the mean projection is positive) and
v = v+ - v-, toward the preferred behaviour and away from the dispreferred one. Other ways to reduce
the deltas to v+ and v- (`AGGREGATES`: the centred first component, the normalized mean) are options,
compared on the tune split in the README.

Baselines on the same pairs: mean-diff (CAA, Rimsky et al. 2023): mean of h(pref) - h(dispref);
pca-diff (repeng, Vogel 2024): first principal component of the centred differences, sign-aligned to
the mean difference. Each method's per-layer vector is scaled to the mean norm of that layer's hidden
state, so strength alpha means the same in every layer and method: alpha = 1 adds a vector as long
as h itself (before the renormalization).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from grains_edge.errors import GrainsError
from grains_edge.model.hooks import decoder_layers
from grains_edge.options import METHODS
from grains_edge.prompts import has_chat_template, plain_prompt
from grains_edge.steer.attribution import DEFAULT_STEPS, ScoreCache, contrastive

DEFAULT_K = 10


class TokenPair(NamedTuple):
    """Token ids of a pair; template = (head, tail) chat-template tokens at the start and end of the prompt."""

    prompt: list[int]
    preferred: list[int]
    dispreferred: list[int]
    template: tuple[int, int] = (0, 0)


def model_context(model) -> int:
    """The longest sequence the model's positions cover (the rule the ONNX export's max_context follows)."""
    config = model.config
    return int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 2048))


def pair_length(pair: TokenPair) -> int:
    """Tokens of the pair's longer sequence, prompt + answer."""
    return len(pair.prompt) + max(len(pair.preferred), len(pair.dispreferred))


def fitting_pairs(model, pairs: Sequence[TokenPair]) -> tuple[list[TokenPair], int]:
    """(the pairs whose sequences fit the model's context, how many did not); none fitting is a GrainsError."""
    context = model_context(model)
    kept = [pair for pair in pairs if pair_length(pair) <= context]
    if pairs and not kept:
        raise GrainsError(
            f"all {len(pairs)} pairs are longer than the model's context ({context} tokens); fix: use shorter pairs"
        )
    return kept, len(pairs) - len(kept)


def bfloat16_is_fast() -> bool:
    """Whether this CPU has native bfloat16 matrix units (AVX512-BF16 or AMX), where autocast pays off."""
    return any(
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def last_token_states(model, tokens: Sequence[int], masked_rows: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """Hidden state of the last token after every decoder layer [variants, layers, hidden]: variant 0 is
    the sequence as it is, variant i > 0 has the positions masked_rows[i-1] zeroed at the input."""
    with torch.inference_mode():
        embeddings = model.get_input_embeddings()(torch.tensor([list(tokens)]))  # [1, seq, hidden]
        batch = embeddings.repeat(1 + len(masked_rows), 1, 1)
        for row, positions in enumerate(masked_rows, 1):
            batch[row, list(positions)] = 0.0
        captured: list[torch.Tensor] = []

        def keep(_module, _args, output):
            captured.append((output[0] if isinstance(output, tuple) else output)[:, -1])

        handles = [layer.register_forward_hook(keep) for layer in decoder_layers(model)]
        try:
            model.base_model(inputs_embeds=batch)
        finally:
            for handle in handles:
                handle.remove()
    return torch.stack(captured, dim=1).float()  # [variants, layers, hidden]


def first_component(differences: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Unit first principal direction of differences [n, hidden], sign-aligned to their mean."""
    data = differences - differences.mean(0) if center else differences
    _, _, vh = torch.linalg.svd(data.double(), full_matrices=False)
    direction = vh[0].float()
    return direction if float(differences.mean(0) @ direction) >= 0 else -direction


def top_positions(scores: torch.Tensor, k: int, sign: float) -> list[int]:
    """Positions of the k scores with the largest sign*score, keeping only those with sign*score > 0."""
    signed = sign * scores
    order = torch.argsort(signed, descending=True)[:k]
    return [int(i) for i in order if signed[i] > 0]


def grains_deltas(
    model, pair: TokenPair, k: int, steps: int, bfloat16: bool = False, attribute: Callable = contrastive
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d+, d-, h(pref)) of one pair, each [layers, hidden]; `attribute` is `contrastive` or a cache's."""
    positive, negative = attribute(model, *pair[:3], steps, pair.template, bfloat16)
    pref = last_token_states(model, positive.tokens, [top_positions(positive.scores, k, +1.0)])
    disp = last_token_states(model, negative.tokens, [top_positions(negative.scores, k, -1.0)])
    return pref[0] - pref[1], disp[0] - disp[1], pref[0]


def scale_to_hidden_norm(directions: torch.Tensor, states: torch.Tensor) -> np.ndarray:
    """directions [layers, hidden] to unit length times the mean hidden norm per layer (states [n, layers, hidden])."""
    unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (unit * states.norm(dim=-1).mean(0)[:, None]).numpy().astype(np.float32)


def per_layer(aggregate: Callable, deltas: torch.Tensor) -> torch.Tensor:
    """aggregate applied to deltas [n, layers, hidden] layer by layer -> [layers, hidden]."""
    return torch.stack([aggregate(deltas[:, layer]) for layer in range(deltas.shape[1])])


# How GRAINS turns one layer's deltas [n, hidden] into a unit direction (v+ or v-).
AGGREGATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "pc1": first_component,  # uncentred: the dominant direction, the mean included
    "centered-pc1": lambda deltas: first_component(deltas, center=True),  # the axis of most variation
    "mean": lambda deltas: deltas.mean(0) / deltas.mean(0).norm().clamp_min(1e-12),
}
DEFAULT_AGGREGATE = "pc1"


def build(
    model,
    pairs: Sequence[TokenPair],
    method: str = "grains",
    k: int = DEFAULT_K,
    steps: int = DEFAULT_STEPS,
    progress: Callable | None = None,
    bfloat16: bool | None = None,
    aggregate: str = DEFAULT_AGGREGATE,
    cache: ScoreCache | None = None,
) -> np.ndarray:
    """Steering vectors [layers, hidden] from token-id pairs (TokenPair or (prompt, preferred, dispreferred))
    with `method` (grains | mean-diff | pca-diff). bfloat16: IG under bfloat16 autocast; None = when fast.
    GRAINS: `aggregate` names the AGGREGATES entry giving v+ and v-; `cache` keeps and reuses attributions."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    pairs = [TokenPair(*pair) for pair in pairs]
    longest = max(map(pair_length, pairs), default=0)
    if longest > model_context(model):  # checked before the model runs: positions past it index out of range
        raise GrainsError(
            f"a pair has {longest} tokens, the model's context is {model_context(model)}; fix: leave out the pairs "
            "longer than the context"
        )
    iterator = progress(pairs) if progress else pairs
    if method == "grains":
        fast = bfloat16_is_fast() if bfloat16 is None else bfloat16
        attribute = cache.contrastive if cache is not None else contrastive
        plus, minus, states = [], [], []
        for number, pair in enumerate(iterator, 1):
            d_plus, d_minus, state = grains_deltas(model, pair, k, steps, fast, attribute)
            plus.append(d_plus)
            minus.append(d_minus)
            states.append(state)
            if cache is not None and number % 10 == 0:
                cache.save()  # an interrupted build resumes from here
        if cache is not None:
            cache.save()
        combine = AGGREGATES[aggregate]
        v_plus, v_minus = per_layer(combine, torch.stack(plus)), per_layer(combine, torch.stack(minus))
        return scale_to_hidden_norm(v_plus - v_minus, torch.stack(states))
    differences, states = [], []
    for prompt, preferred, dispreferred, _ in iterator:
        pref = last_token_states(model, prompt + preferred)[0]
        disp = last_token_states(model, prompt + dispreferred)[0]
        differences.append(pref - disp)
        states.append(pref)
    diffs = torch.stack(differences)  # [n, layers, hidden]
    directions = diffs.mean(0) if method == "mean-diff" else per_layer(AGGREGATES["centered-pc1"], diffs)
    return scale_to_hidden_norm(directions, torch.stack(states))


def chat_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as the user turn, up to and including the assistant header; a model without a
    chat template gets the runtime's plain prompt, so the engine later scores and steers the same ids."""
    messages = [{"role": "user", "content": text}]
    if not has_chat_template(tokenizer):
        return list(tokenizer.encode(plain_prompt(messages)))
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def template_span(prompt: list[int], empty: list[int]) -> tuple[int, int]:
    """(head, tail): the tokens the prompt shares with the empty-message prompt at its start and its end."""
    head = 0
    while head < min(len(prompt), len(empty)) and prompt[head] == empty[head]:
        head += 1
    tail = 0
    while tail < min(len(prompt) - head, len(empty) - head) and prompt[-1 - tail] == empty[-1 - tail]:
        tail += 1
    return head, tail


def tokenize_pairs(tokenizer, pairs) -> list[TokenPair]:
    """Chat-template token ids: the prompt as the user turn up to the assistant header, answers appended."""
    empty = chat_prompt(tokenizer, "")
    result = []
    for pair in pairs:
        prompt = chat_prompt(tokenizer, pair.prompt)
        result.append(
            TokenPair(
                prompt,
                tokenizer.encode(pair.preferred, add_special_tokens=False),
                tokenizer.encode(pair.dispreferred, add_special_tokens=False),
                template_span(prompt, empty),
            )
        )
    return result


def progress_bar(description: str) -> Callable:
    return lambda items: tqdm(items, desc=description, unit="pair")
