"""How a conversation becomes a prompt for a model without a chat template (a base model, such as
Gemma-3-270M's GGUF): one plain-completion rule wherever a prompt is formatted (the runtime's tokenizer,
`vectors`, evaluation), so a profile is built, tuned, evaluated and used on the same token ids."""

from __future__ import annotations

from collections.abc import Sequence


def has_chat_template(tokenizer) -> bool:
    """Whether a tokenizer (ours or a transformers one) carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def plain_prompt(messages: Sequence[dict]) -> str:
    """The conversation as plain `role: content` lines ending with `assistant:`, for models without a chat
    template; encoded with the tokenizer's own special tokens (a base model expects its BOS)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
