"""The prefix cache: its lookup against a brute-force search, prompt steps that continue a cached prefix
against the same prompts run from their first token, and a batcher with the cache against one without."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from grains_edge.runtime.engine import Engine
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.serve.batcher import Batcher, Job, Piece
from grains_edge.serve.prefix_cache import PrefixCache, steering_key
from grains_edge.serve.slots import SlotCache, prompt_groups


@pytest.fixture(scope="module")
def engine(tiny_export) -> Engine:
    return Engine(tiny_export, device="cpu")


def kv_of(tokens: list[int]) -> list[np.ndarray]:
    """Stand-in KV whose values name their tokens, [kv_heads=1, n, head_dim=1]."""
    return [np.array(tokens, np.float32)[None, :, None]]


token_lists = st.lists(st.integers(0, 3), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(stored=st.lists(st.tuples(st.sampled_from([b"a", b"b"]), token_lists), max_size=6), prompt=token_lists)
def test_longest_is_the_longest_shared_start_under_the_same_steering(stored, prompt):
    """Against a search of every stored row: the longest start shared with the prompt (never the prompt's
    last token), under the same steering; the KV handed back holds exactly those tokens."""
    cache = PrefixCache(budget=1 << 20)
    for key, tokens in stored:
        cache.store(key, tokens, kv_of(tokens))

    def shared(a: list[int], b: list[int]) -> int:
        count = 0
        while count < min(len(a), len(b)) and a[count] == b[count]:
            count += 1
        return count

    expected = max([shared(t, prompt[:-1]) for key, t in stored if key == b"a"], default=0)
    entry, length = cache.longest(b"a", prompt)
    assert length == expected
    if length:
        assert entry.kv[0][0, :length, 0].tolist() == prompt[:length]


def test_rows_that_extend_a_row_replace_it_and_the_budget_drops_the_least_recently_used():
    token = kv_of([1])[0].nbytes
    cache = PrefixCache(budget=6 * token)
    cache.store(b"a", [1, 2, 3], kv_of([1, 2, 3]))
    cache.store(b"a", [1, 2, 3, 4, 5], kv_of([1, 2, 3, 4, 5]))  # extends the first
    cache.store(b"a", [1, 2], kv_of([1, 2]))  # held by the longer row already
    assert cache.counts() == {"entries": 1, "bytes": 5 * token, "reused_tokens": 0}
    cache.store(b"b", [7], kv_of([7]))
    cache.store(b"b", [8, 9], kv_of([8, 9]))  # 8 tokens: over budget, the least recently used row goes
    assert cache.longest(b"a", [1, 2, 3, 9]) == (None, 0)
    assert cache.counts()["bytes"] == 3 * token
    cache.store(b"b", list(range(7)), kv_of(list(range(7))))  # larger than the whole budget: not kept
    assert cache.longest(b"b", list(range(7)))[1] == 0
    assert len({steering_key(None), steering_key(np.zeros((2, 3), np.float32)), steering_key(np.ones((2, 3)))}) == 3


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(1, 30), st.integers(0, 29)), min_size=1, max_size=6))
def test_prompt_groups_cover_every_row_once_and_continue_only_what_the_cache_holds(rows):
    lengths = [length for length, _ in rows]
    cached = [min(count, length - 1) for length, count in rows]
    groups = prompt_groups(lengths, cached)
    assert sorted(row for members, _ in groups for row in members) == list(range(len(rows)))
    for members, past in groups:
        assert past == 0 or (len(members) == 1 and 2 * past >= lengths[members[0]] and past == cached[members[0]])
    assert sum(past == 0 for _, past in groups) <= 1  # the rows run from their first token share one step


@settings(max_examples=6, deadline=None)
@example(shapes=[(20, 15), (10, 0), (8, 3)], seed=0)  # one row continues, two run from their start
@given(
    shapes=st.lists(st.tuples(st.integers(2, 30), st.integers(0, 30)), min_size=1, max_size=4),
    seed=st.integers(0, 99),
)
def test_continuing_a_cached_prefix_gives_the_logits_of_the_whole_prompt(engine, shapes, seed):
    """Prompts whose starts were run before (by another slot cache, saved and restored) run in the steps
    `prompt_groups` makes, beside an older row; every row's logits, and its next decode steps', equal the
    whole prompt run alone."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n, _ in shapes]
    cached = [min(count, len(p) - 1) for p, (_, count) in zip(prompts, shapes, strict=True)]
    steerings = rng.normal(0, 5, (len(prompts), engine.num_layers, engine.hidden_size)).astype(np.float32)
    cold, earlier, warm = (SlotCache(engine, 5, 64) for _ in range(3))
    expected = []
    for prompt, steering in zip(prompts, steerings, strict=True):
        rows = [cold.prompts(0, [prompt], steering[None])[0]]
        for _ in range(2):
            rows.append(cold.decode(np.array([int(rows[-1].argmax())]))[0])
        expected.append(rows)
    saved = []
    for prompt, steering, count in zip(prompts, steerings, cached, strict=True):
        if count:
            earlier.prompts(0, [prompt[:count]], steering[None])
        saved.append(earlier.saved(0) if count else None)
    warm.prompts(0, [[5, 6, 7]], steerings[:1])  # an older row in slot 0
    got: dict[int, list[np.ndarray]] = {}
    order = [None]
    for members, past in prompt_groups([len(p) for p in prompts], cached):
        if past:
            warm.restore(len(order), saved[members[0]], past)
        logits = warm.prompts(len(order), [prompts[r] for r in members], steerings[members], past)
        got.update({row: [row_logits] for row, row_logits in zip(members, logits, strict=True)})
        order.extend(members)
    for _ in range(2):
        step = warm.decode(np.array([7, *(int(got[row][-1].argmax()) for row in order[1:])]))
        for row, row_logits in zip(order[1:], step[1:], strict=True):
            got[row].append(row_logits)
    for row, reference in enumerate(expected):
        np.testing.assert_allclose(np.stack(got[row]), np.stack(reference), rtol=1e-4, atol=1e-4)


def run_batcher(engine: Engine, jobs: list[tuple[list[int], np.ndarray]], budget: int) -> tuple[list[str], list[int]]:
    """Greedy texts of (prompt, steering) jobs sent one after another to one batcher; and the prompt tokens
    each reused."""
    batcher = Batcher(engine, max_batch=2, capacity=64, max_queue=4, prefix_cache=budget)
    batcher.start()
    texts, reused = [], []
    for prompt, steering in jobs:
        pieces, done, before = [], threading.Event(), batcher.prefixes.reused_tokens

        def emit(event, pieces=pieces, done=done) -> None:
            if isinstance(event, Piece):
                pieces.append(event.text)
            else:
                done.set()

        batcher.submit(Job(prompt, steering, GenerationSettings(max_new_tokens=5, temperature=0.0), emit))
        assert done.wait(30)
        texts.append("".join(pieces))
        reused.append(batcher.prefixes.reused_tokens - before)
    batcher.close()
    return texts, reused


def test_a_conversation_reuses_its_earlier_turns_and_answers_as_without_the_cache(engine):
    """Three turns, each prompt the previous one plus more tokens, then the first under another steering: with
    a cache the texts equal those without one; the later turns reuse the earlier ones, the other steering
    nothing."""
    rng = np.random.default_rng(3)
    steering = rng.normal(0, 5, (engine.num_layers, engine.hidden_size)).astype(np.float32)
    turn = [int(t) for t in rng.integers(3, 200, 12)]
    prompts = [turn, turn + [5, 6, 7], turn + [5, 6, 7, 8, 9, 10, 11]]
    jobs = [(prompt, steering) for prompt in prompts] + [(turn, steering * 2)]
    with_cache, reused = run_batcher(engine, jobs, budget=1 << 24)
    without, none_reused = run_batcher(engine, jobs, budget=0)
    assert with_cache == without
    assert none_reused == [0, 0, 0, 0]
    assert reused[0] == 0 and reused[1] >= len(turn) and reused[2] >= len(prompts[1]) and reused[3] == 0
