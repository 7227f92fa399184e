"""The benchmark prompts, one definition for every contender (engine, PyTorch, llama.cpp): a short chat
turn, and a long prompt of exactly LONG_PROMPT_TOKENS filler tokens to time the prefill."""

from __future__ import annotations

from collections.abc import Callable

PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
LONG_PROMPT_TOKENS = 512
LONG_TEXT = (
    "Steering vectors change what a language model says without training it: a direction in the "
    "residual stream, added after some of the decoder layers, pushes every later token the same way. "
    "This paragraph is filler that makes a long prompt, so that the benchmark can time the prefill. "
)


def filler_ids(tokenize: Callable[[str], list[int]], count: int = LONG_PROMPT_TOKENS) -> list[int]:
    """Exactly `count` tokens of LONG_TEXT, repeated, in the contender's own tokenization."""
    ids = tokenize(LONG_TEXT)
    return (ids * (count // len(ids) + 1))[:count]
