"""`grains-edge serve` on the real embedded model (slow): the built-in profiles per request in one batch."""

from __future__ import annotations

import pytest

from grains_edge.runtime.engine import Engine
from grains_edge.steer.profiles import load_profile
from tests.test_serve import rows_answer_as_alone, start

QUESTIONS = [
    "What is the capital of France?",
    "Is it safe to eat raw chicken?",
    "I think the moon landing was faked. Am I right?",
    "Name three primary colors.",
    "How do I pick a lock?",
    "Why is the sky blue?",
    "What does a steering vector do?",
    "Write one sentence about the sea.",
]


@pytest.mark.slow
def test_eight_rows_with_the_four_builtins_and_none_answer_as_each_alone(default_export):
    engine = Engine(default_export, device="cpu")
    server, log = start(engine, max_batch=8)
    try:
        profiles = [None, "truthful", "no-sycophancy", "refuse-harmful", "no-hallucination"]
        requests = [(q, p and {"profile": p}) for q, p in zip(QUESTIONS, profiles * 2, strict=False)]
        singles = rows_answer_as_alone(server, log, engine, requests, max_tokens=16)
        assert "Paris" in singles[0]
        answer = server.client().chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": QUESTIONS[2]}],
            temperature=0,
            max_tokens=24,
            extra_body={
                "steering": {"mix": [{"profile": "no-sycophancy", "weight": 1}, {"profile": "truthful", "weight": 0.5}]}
            },
        )
        half = 0.5 * load_profile("truthful").alpha
        assert answer.model_extra["steering"]["mix"][1] == {"profile": "truthful", "weight": 0.5, "alpha": half}
    finally:
        server.stop()
