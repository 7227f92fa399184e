"""How a conversation becomes a prompt for a model without a chat template (a base model, such as
Gemma-3-270M's GGUF): one plain-completion rule wherever a prompt is formatted (the runtime's tokenizer,
`vectors`, evaluation), so a profile is built, tuned, evaluated and used on the same token ids; and the
stop strings that end an answer where such a model would start the next turn itself."""

from __future__ import annotations

from collections.abc import Sequence


def has_chat_template(tokenizer) -> bool:
    """Whether a tokenizer (ours or a transformers one) carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(messages: Sequence[dict]) -> str:
    """The conversation as plain `role: content` lines ending with `assistant:`, for models without a chat
    template; encoded with the tokenizer's own special tokens (a base model expects its BOS)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


# a base model continues a plain prompt with the next turn: the answer ends where that turn starts
PLAIN_TURN_STOPS = ("\nuser:",)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that may be the start of a stop string, so not shown yet."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def stop_at(text: str, stops: Sequence[str], shown: int = 0) -> int | None:
    """Where the first stop string in `text` begins, None when there is none; the first `shown` characters
    were checked before, so only a stop string reaching past them is looked for."""
    hits = [index for index in (text.find(stop, max(0, shown - len(stop))) for stop in stops) if index >= 0]
    return min(hits) if hits else None
