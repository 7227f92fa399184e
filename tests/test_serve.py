"""`grains-edge serve` against the official `openai` client: a live server on a loopback port, tiny exports
(llama and GPT-2); the engine's own generate() is the second path every answer is compared with."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from grains_edge import paths
from grains_edge.cli import main
from grains_edge.runtime.engine import Engine
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.serve.server import build, listen
from grains_edge.steer.profiles import Profile, combine, save_profile

KEY = "test-key-0123"
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]
PROMPTS = [
    "Hello",
    "The capital of France",
    "Steering vectors",
    "How are you?",
    "Integrated gradients",
    "Thank you!",
    "Paris is fine",
    "a language model",
]


class Endpoint:
    """A running server's base URL, reached through the openai client or raw HTTP (also a Ray Serve app's)."""

    def __init__(self, url: str):
        self.url = url

    def client(self, key: str = KEY, max_retries: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=max_retries, timeout=60)

    def post(self, path: str, body, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, str | bytes) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=timeout)


class LiveServer(Endpoint):
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app, batcher):
        self.batcher = batcher
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        batcher.start()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.batcher.close()
        self.sock.close()


class LogitsLog:
    """The batcher's debug hook: every row's logits by prompt, the largest batch seen, an optional delay."""

    def __init__(self):
        self.rows: dict[tuple, list[np.ndarray]] = {}
        self.peak = 0
        self.delay = 0.0
        self.batcher = None

    def __call__(self, job, step, logits):
        self.rows.setdefault(tuple(job.prompt_ids), []).append(logits.copy())
        self.peak = max(self.peak, len(self.batcher.active))
        if self.delay:
            time.sleep(self.delay)


@pytest.fixture(scope="module")
def engine(tiny_export) -> Engine:
    return Engine(tiny_export, device="cpu")


def start(engine: Engine, **options) -> tuple[LiveServer, LogitsLog]:
    log = LogitsLog()
    app, batcher = build(engine, api_key=KEY, on_logits=log, **options)
    log.batcher = batcher
    return LiveServer(app, batcher), log


@pytest.fixture(scope="module")
def live(engine):
    server, log = start(engine, max_batch=8, max_body=64 * 1024)
    yield server, log
    server.stop()


@pytest.fixture
def profiles(engine) -> dict[str, Profile]:
    """Four user profiles for the tiny model (in this test's GRAINS_EDGE_HOME), strong enough to change text."""
    made = {}
    for seed, name in enumerate(("calm", "bold", "terse", "warm")):
        vectors = np.random.default_rng(seed).normal(0, 10, (engine.num_layers, engine.hidden_size)).astype(np.float32)
        profile = Profile(name, vectors, [1, 2], 1.0, "mean-diff", {"description": f"test profile {name}"})
        profile.path = save_profile(profile, paths.profiles_dir() / f"{name}.safetensors")
        made[name] = profile
    return made


def alone(engine: Engine, messages, steering=None, max_tokens: int = 12) -> str:
    return "".join(engine.chat(messages, steering, GenerationSettings(max_new_tokens=max_tokens)))


def test_chat_answers_as_the_engine_does_with_the_requested_steering(live, engine, profiles):
    server, _ = live
    client = server.client()
    plain = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=12)
    steered = client.chat.completions.create(
        model="m",
        messages=HELLO,
        temperature=0,
        max_tokens=12,
        extra_body={"steering": {"profile": "bold", "alpha": 2}},
    )
    assert plain.choices[0].message.content == alone(engine, HELLO)
    assert steered.choices[0].message.content == alone(engine, HELLO, combine([(profiles["bold"], 2.0)]))
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert plain.model_extra["steering"] == {"profile": "none"}
    assert steered.model_extra["steering"] == {"profile": "bold", "alpha": 2.0}
    prompt_tokens = len(engine.chat_ids(HELLO))
    assert plain.usage.prompt_tokens == prompt_tokens
    assert plain.usage.total_tokens == prompt_tokens + plain.usage.completion_tokens
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_a_mix_steers_as_profiles_combine_with_alpha_weight_times_default(live, engine, profiles):
    server, _ = live
    mix = [{"profile": "calm", "weight": 1}, {"profile": "terse", "weight": 0.5}]
    answer = server.client().chat.completions.create(
        model="m", messages=HELLO, temperature=0, max_tokens=12, extra_body={"steering": {"mix": mix}}
    )
    expected = combine([(profiles["calm"], 1.0), (profiles["terse"], 0.5)])
    assert answer.choices[0].message.content == alone(engine, HELLO, expected)
    assert [term["alpha"] for term in answer.model_extra["steering"]["mix"]] == [1.0, 0.5]


def test_streaming_sends_the_non_streaming_text_in_openai_chunks(live, profiles):
    server, _ = live
    client = server.client()
    request = dict(
        model="m", messages=HELLO, temperature=0, max_tokens=12, extra_body={"steering": {"profile": "warm"}}
    )
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].model_extra["steering"] == {"profile": "warm", "alpha": 1.0}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_stop_strings(live, engine):
    server, _ = live
    client = server.client()
    prompt = "The capital of France"
    full = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16)
    expected = "".join(engine.generate(engine.tokenizer.encode(prompt), None, GenerationSettings(max_new_tokens=16)))
    assert full.choices[0].text == expected and full.object == "text_completion"
    stop = full.choices[0].text[5:8]
    cut = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].text == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(live):
    server, _ = live
    client = server.client()

    def sample(seed):
        answer = client.chat.completions.create(
            model="m", messages=HELLO, temperature=1.0, top_p=0.95, seed=seed, max_tokens=16
        )
        return answer.choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_models_profiles_and_health(live, engine, profiles):
    server, _ = live
    assert [m.id for m in server.client().models.list()] == [engine.export_dir.name]
    listed = httpx.get(f"{server.url}/v1/steering/profiles", headers={"Authorization": f"Bearer {KEY}"}).json()
    mine = {p["name"]: p for p in listed["data"] if not p["builtin"]}
    assert set(mine) == set(profiles) and all(p["fits"] for p in mine.values())
    assert mine["calm"]["metadata"]["description"] == "test profile calm"
    assert not any(p["fits"] for p in listed["data"] if p["builtin"])  # built for the real model
    assert listed["default"] == {"profile": "none"}
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # no key needed


@pytest.mark.parametrize(
    ("steering", "problem"),
    [
        ({"profile": "nope"}, "unknown profile 'nope'"),
        ({"profile": "../../etc/passwd"}, "must be a profile name"),
        ({"profile": "calm", "alpha": "strong"}, "finite number"),
        ({"mix": []}, "non-empty list"),
        ({"profile": "calm", "mix": []}, "either"),
        ({"mix": [{"profile": "calm", "weight": 1e38}, {"profile": "bold", "weight": 1e38}]}, "overflows float32"),
    ],
)
def test_bad_steering_is_an_openai_invalid_request_error(live, profiles, steering, problem):
    server, _ = live
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().chat.completions.create(
            model="m", messages=HELLO, max_tokens=4, extra_body={"steering": steering}
        )
    error = raised.value.body
    assert problem in error["message"] and "fix:" in error["message"]
    assert raised.value.code == "invalid_steering" and error["param"] == "steering"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-1e999"])
def test_non_finite_alpha_in_raw_json_is_refused(live, profiles, alpha):
    server, _ = live
    body = '{"messages": [{"role": "user", "content": "Hi"}], "steering": {"profile": "calm", "alpha": ALPHA}}'
    body = body.replace("ALPHA", alpha)
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 400 and "finite" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param", "problem"),
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "JSON object"),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "role"),
        ({"messages": HELLO, "n": 2}, "n", "n=2 is not supported"),
        ({"messages": HELLO, "temperature": -1}, "temperature", "in [0, 2]"),
        ({"messages": HELLO, "top_p": 0}, "top_p", "in (0, 1]"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "integer ≥ 1"),
        ({"messages": HELLO, "stop": [""]}, "stop", "stop must be"),
        ({"messages": HELLO, "stream": "yes"}, "stream", "stream must be"),
    ],
)
def test_malformed_bodies_are_openai_errors(live, body, param, problem):
    server, _ = live
    response = server.post("/v1/chat/completions", body)
    error = response.json()["error"]
    assert response.status_code == 400 and problem in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_a_prompt_over_the_context_is_refused_and_max_tokens_is_capped(live, engine):
    server, _ = live
    client = server.client()
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="m", prompt="Hello " * 400, max_tokens=4)
    assert raised.value.code == "context_length_exceeded"
    prompt = "Hello " * 12
    room = engine.max_context - len(engine.tokenizer.encode(prompt))
    answer = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=10_000)
    assert answer.usage.completion_tokens <= room
    assert answer.choices[0].finish_reason == "stop" or answer.usage.completion_tokens == room


def test_a_body_over_the_limit_is_413(live):
    server, _ = live
    response = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100_000}]})
    assert response.status_code == 413 and "fix:" in response.json()["error"]["message"]


def test_the_api_key_is_required_everywhere_but_health(live):
    server, _ = live
    with pytest.raises(openai.AuthenticationError) as raised:
        server.client("wrong-key").models.list()
    assert raised.value.code == "invalid_api_key"
    for path in ("/v1/models", "/v1/steering/profiles"):
        assert httpx.get(f"{server.url}{path}").status_code == 401
    assert server.post("/v1/chat/completions", {"messages": HELLO}, key=None).status_code == 401
    assert server.post("/v1/completions", {"prompt": "x"}, key=KEY[:-1]).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}).json()["error"]


def rows_answer_as_alone(
    server: LiveServer, log: LogitsLog, engine: Engine, requests: list, max_tokens: int, bad: tuple = ()
) -> list:
    """Send (prompt, steering) requests all at once (with the `bad` bodies, each of which must be refused),
    then one by one; assert each row's greedy text is the text it gets alone or, where batched arithmetic broke
    a near-tie differently, that the two runs' logits at the first differing step agree within 1e-4 relative
    (rounding, never another row's steering leaking in). Returns the texts of the lone runs."""
    client = server.client()

    def ask(request) -> str:
        prompt, steering = request
        answer = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=max_tokens,
            extra_body={"steering": steering} if steering else {},
        )
        return answer.choices[0].message.content

    log.rows, log.peak, log.delay = {}, 0, 0.003  # slow steps a little, so all rows overlap
    with ThreadPoolExecutor(len(requests) + len(bad)) as pool:
        refused = [pool.submit(server.post, "/v1/chat/completions", body) for body in bad]
        together = list(pool.map(ask, requests))
    assert all(response.result().status_code == 400 for response in refused)
    batched_logits, log.rows, log.delay = log.rows, {}, 0.0
    assert log.peak >= len(requests) - 2
    singles = [ask(request) for request in requests]
    for (prompt, _), text, single in zip(requests, together, singles, strict=True):
        if text != single:
            key = tuple(engine.chat_ids([{"role": "user", "content": prompt}]))
            pairs = list(zip(batched_logits[key], log.rows[key], strict=False))
            batched, lone = next((a, b) for a, b in pairs if a.argmax() != b.argmax())
            assert np.abs(batched - lone).max() <= 1e-4 * np.abs(lone).max()
    return singles


def test_concurrent_rows_with_different_steerings_answer_as_each_alone(live, engine, profiles):
    """8 greedy requests at once, 4 profiles and none, among bad requests that are refused without disturbing
    them; the lone runs are the engine's own answers."""
    server, log = live
    steerings = [
        None,
        {"profile": "calm"},
        {"profile": "bold", "alpha": 1.5},
        {"profile": "terse"},
        {"profile": "warm"},
    ]
    requests = [(prompt, steerings[i % len(steerings)]) for i, prompt in enumerate(PROMPTS)]
    bad = [
        {"messages": HELLO, "steering": {"profile": "nope"}},
        {"messages": HELLO, "steering": {"profile": "calm", "alpha": "x"}},
        {"messages": HELLO, "n": 3},
        {"prompt": "no messages"},
    ]
    singles = rows_answer_as_alone(server, log, engine, requests, max_tokens=24, bad=tuple(bad))
    for (prompt, steering), single in zip(requests, singles, strict=True):
        tensor = None if steering is None else combine([(profiles[steering["profile"]], steering.get("alpha"))])
        assert single == alone(engine, [{"role": "user", "content": prompt}], tensor, max_tokens=24)


def test_a_bad_default_profile_is_one_line_before_the_model_loads(capsys, tiny_export):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    assert main(["serve", "--model", str(tiny_export), "--port", port, "--profile", "nope"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown profile 'nope'" in error[0] and "fix:" in error[0]


def test_the_server_default_profile_applies_when_a_request_names_none(engine, profiles):
    server, _ = start(engine, max_batch=2, profile="calm", alpha=2.0)
    try:
        client = server.client()
        default = client.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=12)
        unsteered = client.chat.completions.create(
            model="m", messages=HELLO, temperature=0, max_tokens=12, extra_body={"steering": {"profile": "none"}}
        )
        assert default.model_extra["steering"] == {"profile": "calm", "alpha": 2.0}
        assert default.choices[0].message.content == alone(engine, HELLO, combine([(profiles["calm"], 2.0)]))
        assert unsteered.choices[0].message.content == alone(engine, HELLO)
    finally:
        server.stop()
