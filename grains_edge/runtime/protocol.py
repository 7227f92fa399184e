"""What the chat, `ask` and the tests' fake engine agree on: the calls an engine answers and the records it
takes and gives. `Engine` (engine.py) implements it on ONNX Runtime; tests/fake_engine.py without a model."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from grains_edge.export.manifest import Manifest


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (1 = off)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_seconds: float = 0.0
    decode_seconds: float = 0.0
    stopped_by: str = ""  # eos | length | user

    @property
    def tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds else 0.0


@runtime_checkable
class ChatEngine(Protocol):
    """One loaded model that streams answers, a steering tensor [num_layers, hidden] (or None) per call."""

    manifest: Manifest  # what the export holds: the chat names the model from it
    provider: str  # the ONNX Runtime execution provider the session runs on
    last_stats: GenerationStats  # of the latest finished generate()

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def max_context(self) -> int: ...

    @property
    def has_chat_template(self) -> bool: ...

    def zero_steering(self) -> np.ndarray: ...

    def chat_ids(self, messages: Sequence[dict]) -> list[int]: ...

    def generate(
        self,
        prompt_ids: list[int],
        steering: np.ndarray | None = None,
        settings: GenerationSettings | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[str]: ...

    def chat(
        self,
        messages: Sequence[dict],
        steering: np.ndarray | None = None,
        settings: GenerationSettings | None = None,
        stop: threading.Event | None = None,
    ) -> Iterator[str]: ...
