"""Continuous batching under arrivals and departures: the KV slots against the engine's own steps, a client
that drops mid-stream freeing its slot for the next request, the bounded queue, and the CLI end to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grains_edge.runtime.engine import Engine
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.serve.batcher import Batcher, Failed, Finished, Job, Piece
from grains_edge.serve.slots import MASK_STEP, SlotCache
from tests.test_serve import KEY, start


@pytest.fixture(scope="module")
def engine(tiny_export) -> Engine:
    return Engine(tiny_export, device="cpu")


def single_row_logits(engine: Engine, ids: list[int], steering: np.ndarray, steps: int) -> list[np.ndarray]:
    """Greedy logits of one row decoded alone by the engine's own cache and step()."""
    cache = engine.new_cache(1, len(ids) + steps + 1)
    batched = engine.batched_steering(steering, 1)
    logits = [engine.step(np.array([ids]), batched, cache)[0]]
    for _ in range(steps):
        logits.append(engine.step(np.array([[int(logits[-1].argmax())]]), batched, cache)[0])
    return logits


def test_slots_decode_rows_of_different_lengths_and_steerings_as_each_alone(engine):
    """Three rows (prompts of 3, 60 and 5 tokens, three steerings) decode together; then the first row leaves,
    the last is moved into its slot, and both go on, the long row past the first mask width (MASK_STEP);
    every logit equals the row's own single-row run."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 200, n)) for n in (3, MASK_STEP - 4, 5)]
    steerings = [engine.zero_steering(), *(rng.normal(0, 5, (2, engine.num_layers, engine.hidden_size)))]
    steerings = [s.astype(np.float32) for s in steerings]
    expected = [single_row_logits(engine, p, s, 8) for p, s in zip(prompts, steerings, strict=True)]
    slots = SlotCache(engine, max_batch=4, capacity=100)
    got = [[slots.prompts(i, [p], s[None])[0]] for i, (p, s) in enumerate(zip(prompts, steerings, strict=True))]
    for _ in range(4):
        step = slots.decode(np.array([int(rows[-1].argmax()) for rows in got]))
        for rows, logits in zip(got, step, strict=True):
            rows.append(logits)
    slots.move(2, 0)  # row 0 leaves: row 2 takes its slot
    slots.clear(2)
    got = [got[2], got[1]]
    for _ in range(4):
        step = slots.decode(np.array([int(rows[-1].argmax()) for rows in got]))
        for rows, logits in zip(got, step, strict=True):
            rows.append(logits)
    for rows, reference in zip(got, [expected[2], expected[1]], strict=True):
        np.testing.assert_allclose(np.stack(rows), np.stack(reference), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        slots.prompts(3, [list(range(3, 110))], steerings[0][None])
    assert slots.window.shape == (2, 100)  # the long row's 69 tokens: the mask grew to the slot's capacity


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_newcomers_prompted_in_one_step_decode_as_each_prompted_alone(engine, lengths, seed):
    """Prompts of different lengths and steerings, right-padded into one prompt step on slots 1.. (slot 0 is
    busy with an older row), give every row the logits and greedy tokens of its own batch-1 prompt step."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(3, 200, n)] for n in lengths]
    steerings = rng.normal(0, 5, (len(prompts), engine.num_layers, engine.hidden_size)).astype(np.float32)
    steerings[0] = engine.zero_steering()
    alone, together = SlotCache(engine, 5, 64), SlotCache(engine, 5, 64)
    for slots in (alone, together):
        slots.prompts(0, [[5, 6, 7]], steerings[:1])
    expected = [[alone.prompts(0, [p], s[None])[0]] for p, s in zip(prompts, steerings, strict=True)]
    for rows, (p, s) in zip(expected, zip(prompts, steerings, strict=True), strict=True):
        alone.prompts(0, [p], s[None])  # each row decoded alone on slot 0
        for _ in range(3):
            rows.append(alone.decode(np.array([int(rows[-1].argmax())]))[0])
    got = [[logits] for logits in together.prompts(1, prompts, steerings)]
    older = 7
    for _ in range(3):
        step = together.decode(np.array([older, *(int(rows[-1].argmax()) for rows in got)]))
        older = int(step[0].argmax())
        for rows, logits in zip(got, step[1:], strict=True):
            rows.append(logits)
    for rows, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.stack(rows), np.stack(reference), rtol=1e-4, atol=1e-5)
        assert [int(r.argmax()) for r in rows] == [int(r.argmax()) for r in reference]


def greedy_texts(
    engine: Engine, jobs: list[tuple[list[int], np.ndarray | None]], max_batch: int
) -> tuple[list[str], list[int]]:
    """Run jobs through a Batcher, all queued before its loop starts; their texts, and the prompt steps' rows."""
    batcher = Batcher(engine, max_batch=max_batch, capacity=64, max_queue=len(jobs))
    prompt_rows: list[int] = []  # the rows of each prompt step
    prompts = batcher.slots.prompts

    def counted_prompts(first: int, rows: list[list[int]], steerings: np.ndarray, past: int = 0) -> np.ndarray:
        prompt_rows.append(len(rows))
        return prompts(first, rows, steerings, past)

    batcher.slots.prompts = counted_prompts
    texts, done = [""] * len(jobs), threading.Semaphore(0)

    def emit(index: int, event) -> None:
        if isinstance(event, Piece):
            texts[index] += event.text
        else:
            done.release()

    for index, (ids, steering) in enumerate(jobs):
        job_settings = GenerationSettings(max_new_tokens=6, temperature=0.0)
        batcher.submit(Job(ids, steering, job_settings, lambda event, i=index: emit(i, event), ignore_eos=True))
    batcher.start()
    for _ in jobs:
        assert done.acquire(timeout=30)
    batcher.close()
    return texts, prompt_rows


def test_waiting_requests_share_one_prompt_step_and_answer_as_each_alone(engine):
    """Four requests (prompts of 2 to 30 tokens, three steerings and none) waiting at the same turn are prompted
    in one step of four rows; each greedy text equals the one it gets alone on a one-slot batcher."""
    rng = np.random.default_rng(1)
    steerings = [None, *rng.normal(0, 5, (3, engine.num_layers, engine.hidden_size)).astype(np.float32)]
    jobs = [([int(t) for t in rng.integers(3, 200, n)], s) for n, s in zip((2, 30, 9, 17), steerings, strict=True)]
    together, rows = greedy_texts(engine, jobs, max_batch=4)
    alone, lone_rows = greedy_texts(engine, jobs, max_batch=1)
    assert rows == [4] and lone_rows == [1, 1, 1, 1]
    assert together == alone
    assert all(together)


def first_stop(engine: Engine, tokens: list[int], stops: tuple[str, ...]) -> tuple[str, str]:
    """The reference: decode ever longer prefixes; at the first that holds a stop, cut before the earliest."""
    for end in range(1, len(tokens) + 1):
        text = engine.tokenizer.decode(tokens[:end])
        found = [text.index(stop) for stop in stops if stop in text]
        if found:
            return text[: min(found)], "stop"
    return engine.tokenizer.decode(tokens), "length"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stop_strings_cut_the_stream_where_the_first_one_appears(engine, data):
    """Token by token through the batcher's own `advance`: the pieces it emits join to the text cut before
    the first stop string, never showing any of it, and the finish reason says why it ended."""
    vocab = engine.tokenizer.get_vocab()
    printable = sorted(i for i in vocab.values() if i not in engine.stop_ids and engine.tokenizer.decode([i]).isascii())
    tokens = data.draw(st.lists(st.sampled_from(printable), min_size=1, max_size=12))
    text = engine.tokenizer.decode(tokens)
    pieces = st.integers(0, max(0, len(text) - 1)).flatmap(lambda i: st.integers(1, 4).map(lambda n: text[i : i + n]))
    stops = tuple(
        s for s in data.draw(st.lists(st.one_of(pieces, st.text("ab \n", min_size=1, max_size=3)), max_size=3)) if s
    )
    events = []
    batcher = Batcher(engine, max_batch=1, capacity=64, max_queue=1)
    job = Job([1], None, GenerationSettings(max_new_tokens=len(tokens)), events.append, stops)
    batcher.active.append(job)
    batcher.state[job] = (np.random.default_rng(0), np.zeros(engine.manifest.vocab_size, bool))
    job.answer = engine.tokenizer.stream()  # as `admit` gives it
    for token in tokens:
        batcher.advance(job, np.eye(engine.manifest.vocab_size, dtype=np.float32)[token])
        if job.done:
            break
    expected, reason = first_stop(engine, tokens, stops)
    assert "".join(e.text for e in events if isinstance(e, Piece)) == expected
    assert isinstance(events[-1], Finished) and events[-1].reason == reason
    assert job.done and not batcher.active


def test_a_row_whose_logits_are_not_finite_fails_alone(engine):
    """NaN logits in one row (a steering strong enough to overflow, a damaged export) end that request with
    an error naming the fix; the row beside it goes on and finishes."""
    vocab = engine.manifest.vocab_size
    events: dict[int, list] = {0: [], 1: []}
    batcher = Batcher(engine, max_batch=2, capacity=64, max_queue=1)
    jobs = [Job([1], None, GenerationSettings(max_new_tokens=2), events[i].append) for i in range(2)]
    for job in jobs:
        batcher.active.append(job)
        batcher.state[job] = (np.random.default_rng(0), np.zeros(vocab, bool))
        job.answer = engine.tokenizer.stream()  # as `admit` gives it
    token = next(i for i in range(vocab) if i not in engine.stop_ids)
    batcher.advance(jobs[0], np.full(vocab, np.nan, np.float32))
    batcher.advance(jobs[1], np.eye(vocab, dtype=np.float32)[token])
    assert isinstance(events[0][-1], Failed) and "non-finite logits" in events[0][-1].message
    assert batcher.active == [jobs[1]]
    batcher.advance(jobs[1], np.eye(vocab, dtype=np.float32)[token])
    assert isinstance(events[1][-1], Finished) and events[1][-1].completion_tokens == 2


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_for(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_dropped_stream_frees_its_slot_for_the_next_request_and_the_queue_is_bounded(engine):
    server, log = start(engine, max_batch=2, max_queue=1)
    log.delay = 0.01  # ~20 ms steps: the long rows are still running while the test acts
    try:
        client = server.client()
        headers = {"Authorization": f"Bearer {KEY}"}

        def body(content: str, max_tokens: int, stream: bool) -> dict:
            messages = [{"role": "user", "content": content}]
            return {
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": stream,
                "ignore_eos": True,
            }

        finished: dict[str, object] = {}

        def stays(name: str, content: str, max_tokens: int) -> None:
            finished[name] = client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )

        stayer = threading.Thread(target=stays, args=("stayer", "Hello", 30))
        dropped = {"messages": [{"role": "user", "content": "Thank you!"}], "max_tokens": 100, "stream": True}
        dropped |= {"temperature": 0, "ignore_eos": True}
        dropped_key = tuple(engine.chat_ids([{"role": "user", "content": "Thank you!"}]))
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{server.url}/v1/chat/completions", headers=headers, json=dropped) as drop:
                lines = drop.iter_lines()
                first = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
                assert first["steering"] == {"profile": "none"}
                stayer.start()
                wait_for(lambda: health(server.url)["active"] == 2)
                waiter = threading.Thread(target=stays, args=("waiter", "Paris", 10))
                waiter.start()
                wait_for(lambda: health(server.url)["queued"] == 1)
                with pytest.raises(openai.RateLimitError) as raised:  # one waiting already: the queue is full
                    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
                assert raised.value.response.headers["Retry-After"] == "1"
                assert raised.value.code == "queue_full"
                assert waiter.is_alive()  # it waits for a slot while both rows decode
            # the stream is closed here: its row is cancelled and the waiting request takes the slot
            waiter.join(timeout=30)
            stayer.join(timeout=30)
        assert finished["waiter"].choices[0].finish_reason == "length"
        assert finished["waiter"].usage.completion_tokens == 10
        assert finished["stayer"].usage.completion_tokens == 30
        assert len(log.rows[dropped_key]) < 100  # the dropped row stopped decoding
        wait_for(
            lambda: (
                health(server.url) | {"prefix_cache": None}
                == {"status": "ok", "active": 0, "queued": 0, "max_batch": 2, "prefix_cache": None}
            )
        )
    finally:
        server.stop()


def test_a_non_streaming_client_that_gives_up_cancels_its_row(engine):
    server, log = start(engine, max_batch=2)
    log.delay = 0.02  # 100 tokens would take over 2 s
    try:
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            server.post("/v1/chat/completions", body, timeout=0.3)
        wait_for(lambda: health(server.url)["active"] == 0, seconds=1.5)
        assert len(log.rows[tuple(engine.chat_ids(body["messages"]))]) < 100
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_cli_serves_until_interrupted_and_a_busy_port_is_one_line(tiny_export, tmp_path):
    port = free_port()
    environment = {**os.environ, "GRAINS_EDGE_HOME": str(tmp_path / "home"), "GRAINS_EDGE_API_KEY": KEY}
    command = [sys.executable, "-m", "grains_edge.cli", "serve", "--model", str(tiny_export), "--port", str(port)]
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: process.poll() is None and reachable(port), seconds=60)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        answer = client.completions.create(
            model="m", prompt="Hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
        )
        assert answer.usage.completion_tokens == 3
        busy = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
        assert busy.returncode == 2
        assert busy.stderr.strip().splitlines() == [
            f"grains-edge: error: cannot listen on 127.0.0.1:{port} (Address already in use); fix: pick another --port"
        ]
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130  # ctrl+c: a clean shutdown, the conventional status
        assert "Traceback" not in process.stderr.read()


def reachable(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_a_request_for_a_free_slot_is_not_refused_by_an_empty_queue(engine):
    server, _ = start(engine, max_batch=1, max_queue=0)
    try:
        answer = server.client().completions.create(model="m", prompt="Hello", max_tokens=2, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--context", "1"], "--context must be at least 2"),
        (["--max-queue", "-1"], "--max-queue must be 0 or more"),
        (["--prefix-cache", "-1"], "--prefix-cache must be 0 (off) or more MiB"),
        (["--port", "70000"], "--port must be in 1-65535"),
        (["--alpha", "0.5"], "--alpha sets the default profile's strength"),
    ],
)
def test_impossible_limits_are_one_line_before_the_model_loads(capsys, option, problem):
    from grains_edge.cli import main

    assert main(["serve", "--model", "/nonexistent/model", *option]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0] and "fix:" in lines[0]
