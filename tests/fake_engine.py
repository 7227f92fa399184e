"""A stand-in for grains_edge.runtime.engine.Engine: canned replies with tiny sleeps, every call's steering recorded."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from grains_edge.errors import GrainsError
from grains_edge.runtime.protocol import GenerationSettings, GenerationStats
from grains_edge.steer.profiles import Profile
from grains_edge.store.conversations import open_store
from grains_edge.tui.app import ChatApp
from grains_edge.tui.steering import ProfileLibrary

LAYERS, HIDDEN = 4, 8


class PromptIds(list):
    """Token ids that remember the messages they encode."""

    messages: list[dict]


@dataclass
class Call:
    messages: list[dict]
    steering: np.ndarray | None
    settings: GenerationSettings


def plain_reply(messages: list[dict], steering: np.ndarray | None) -> str:
    if steering is None or not steering.any():
        return "The capital of France is **Paris**. It has been the capital since the 10th century."
    return f"Steered reply (norm {np.linalg.norm(steering):.2f}): Paris, *definitely* Paris."


class FakeEngine:
    """Same API as Engine: words are tokens, a steady 40 tokens/s in the stats, no model."""

    provider = "CPUExecutionProvider"
    has_chat_template = True

    def __init__(
        self,
        reply: Callable[[list[dict], np.ndarray | None], str] = plain_reply,
        delay: float = 0.001,
        max_context: int = 2048,
    ):
        self.manifest = SimpleNamespace(
            source_model="fake/SmolLM2-135M-Instruct", quantization="none", weights_fingerprint="fake"
        )
        self.num_layers, self.hidden_size, self.max_context = LAYERS, HIDDEN, max_context
        self.reply = reply
        self.delay = delay
        self.calls: list[Call] = []
        self.last_stats = GenerationStats()

    def zero_steering(self) -> np.ndarray:
        return np.zeros((self.num_layers, self.hidden_size), np.float32)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        ids = PromptIds(range(sum(4 + len(message["content"].split()) for message in messages) + 3))
        ids.messages = list(messages)
        return ids

    def generate(
        self,
        prompt_ids: list[int],
        steering: np.ndarray | None = None,
        settings: GenerationSettings | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[str]:
        settings = settings or GenerationSettings()
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise GrainsError(
                f"the prompt has {len(prompt_ids)} tokens, the model's context is {self.max_context}; "
                "fix: shorten the message or clear the conversation"
            )
        messages = getattr(prompt_ids, "messages", [])
        self.calls.append(Call(messages, None if steering is None else np.array(steering), settings))
        stats = GenerationStats(prompt_tokens=len(prompt_ids), first_token_seconds=0.05, stopped_by="eos")
        self.last_stats = stats
        for piece in re.findall(r"\s*\S+", self.reply(messages, steering)):
            if stats.new_tokens >= min(settings.max_new_tokens, room):
                stats.stopped_by = "length"
                break
            time.sleep(self.delay)
            stats.new_tokens += 1
            stats.decode_seconds = max(0, stats.new_tokens - 1) / 40
            yield piece
            if stop is not None and stop.is_set():
                stats.stopped_by = "user"
                break

    def chat(self, messages, steering=None, settings=None, stop=None) -> Iterator[str]:
        return self.generate(self.chat_ids(messages), steering, settings, stop)


def fake_profile(name: str, layer: int, alpha: float = 0.5, method: str = "grains", description: str = "") -> Profile:
    """A profile for the fake engine's shape whose vector is all ones on one layer."""
    vectors = np.zeros((LAYERS, HIDDEN), np.float32)
    vectors[layer] = 1.0
    metadata = {"description": description} if description else {}
    return Profile(name=name, vectors=vectors, layers=[layer], alpha=alpha, method=method, metadata=metadata)


PROFILES = [
    fake_profile("truthful", 1, 0.6, description="True answers over popular misconceptions (TruthfulQA)"),
    fake_profile("concise", 2, 0.4, "mean-diff"),
    fake_profile("formal", 3),
]


def fake_app(
    db_path: Path, engine: FakeEngine | None = None, profile: str | None = None, **options
) -> tuple[ChatApp, FakeEngine]:
    """The chat on a FakeEngine with PROFILES on offer (none of the user's or built-in profiles).

    The history is opened as `grains-edge chat` opens it: a damaged or read-only file gives a fallback.
    """
    engine = engine or FakeEngine()
    library = ProfileLibrary((LAYERS, HIDDEN), source=lambda: PROFILES)
    library.refresh()
    store, notice = open_store(db_path)
    return ChatApp(engine, store, library, library.chosen(profile), notice=notice, **options), engine


async def type_and_send(pilot, text: str) -> None:
    """Type `text` into the message box, send it and wait until the reply is on screen."""
    composer = pilot.app.query_one("#composer")
    composer.focus()
    composer.insert(text)
    await pilot.press("enter")
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
