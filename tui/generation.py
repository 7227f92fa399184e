"""Replies without the UI: fitting the prompt into the context, answers interleaved, each piece stored as it streams."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from grains_edge.runtime.protocol import GenerationSettings, GenerationStats
from grains_edge.store.conversations import ConversationStore


def fit_prompt(engine, history: Sequence[dict], system_prompt: str, max_new_tokens: int) -> tuple[list[int], int]:
    """Prompt ids for a reply to `history`, dropping the oldest turns until the reply has room.

    Returns (ids, number of messages dropped). The last message is always kept: if it alone is too
    long, the engine refuses it with a GrainsError.
    """
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    reserve = min(max_new_tokens, engine.max_context // 2)
    start = 0
    while True:
        ids = engine.chat_ids([*system, *history[start:]])
        if len(ids) + reserve <= engine.max_context or start >= len(history) - 1:
            return ids, start
        start += 1
        while start < len(history) - 1 and history[start]["role"] != "user":
            start += 1  # a conversation starts with the user


def interleave(
    engine,
    prompt_ids: list[int],
    steerings: Sequence[np.ndarray | None],
    settings: GenerationSettings,
    stop: threading.Event,
    on_piece: Callable[[int, str], None],
) -> list[GenerationStats]:
    """Generate one answer per steering, token by token in turn (the engine runs one step at a time).

    `on_piece(index, text)` receives each piece; returns each answer's stats.
    """
    generators = [engine.generate(prompt_ids, steering, settings, stop) for steering in steerings]
    stats: list[GenerationStats | None] = [None] * len(generators)
    active = list(range(len(generators)))
    while active:
        for index in list(active):
            try:
                piece = next(generators[index])
            except StopIteration:
                active.remove(index)
                piece = ""
            if stats[index] is None:  # the engine publishes a run's stats when it starts
                stats[index] = engine.last_stats
            if piece:
                on_piece(index, piece)
    return stats


class StoredReply:
    """An answer's text as it streams: each piece is appended to its message row (one commit) before it is shown."""

    def __init__(self, store: ConversationStore, message_id: int):
        self.store = store
        self.message_id = message_id
        self.text = ""  # what is stored, so what may be shown

    def add(self, piece: str) -> None:
        """Store `piece`; raises HistoryError (and keeps nothing) if it can't be stored."""
        self.store.append_to_message(self.message_id, piece)
        self.text += piece

    def finish(self) -> None:
        self.store.finish_message(self.message_id)
