"""The timed engine runs shared by bench_engine.py and bench_speed.py, importing neither torch nor
transformers, so that an engine worker's peak RSS is the engine's own."""

from __future__ import annotations

import time

import numpy as np

from grains_edge.runtime.engine import Engine
from grains_edge.runtime.protocol import GenerationSettings


def engine_run(engine: Engine, ids: list[int], steering: np.ndarray | None, tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) for a greedy run of exactly `tokens` tokens."""
    steer = engine.batched_steering(steering, 1)
    cache = engine.new_cache(1, len(ids) + tokens)
    started = time.perf_counter()
    logits = engine.step(np.asarray([ids]), steer, cache)  # [1, vocab]
    first = time.perf_counter()
    for _ in range(tokens - 1):
        logits = engine.step(np.asarray([[int(logits[0].argmax())]]), steer, cache)
    done = time.perf_counter()
    return first - started, (tokens - 1) / (done - first)


def engine_stream_run(engine: Engine, ids: list[int], steering: np.ndarray | None, tokens: int) -> float:
    """Decode tokens/s through the public streaming API (detokenization included)."""
    settings = GenerationSettings(max_new_tokens=tokens)
    list(engine.generate(ids, steering, settings))
    return engine.last_stats.tokens_per_second
