"""`grains-edge serve --ray`: the serve client tests of test_serve.py, re-collected here against a Ray Serve app
of two replicas on a local Ray instance, then the default model's two replicas: requests land on both, a
profile saved while they run is listed by both, and a replica killed mid-load is replaced while nothing hangs."""

from __future__ import annotations

import json
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is not installed; fix: pip install 'grains-edge[cluster]'")
serve = pytest.importorskip("ray.serve")

from grains_edge import paths  # noqa: E402
from grains_edge.cli import main  # noqa: E402
from grains_edge.errors import GrainsError  # noqa: E402
from grains_edge.export.manifest import Manifest  # noqa: E402
from grains_edge.serve import ray_app  # noqa: E402
from grains_edge.serve.server import listen  # noqa: E402
from grains_edge.steer.profiles import Profile, save_profile  # noqa: E402
from tests.test_serve import (  # noqa: E402, F401  (fixtures and tests of the plain server, run here through Ray)
    HELLO,
    KEY,
    Endpoint,
    engine,
    profiles,
    test_a_body_over_the_limit_is_413,
    test_a_mix_steers_as_profiles_combine_with_alpha_weight_times_default,
    test_a_prompt_over_the_context_is_refused_and_max_tokens_is_capped,
    test_bad_steering_is_an_openai_invalid_request_error,
    test_chat_answers_as_the_engine_does_with_the_requested_steering,
    test_completions_and_stop_strings,
    test_malformed_bodies_are_openai_errors,
    test_models_profiles_and_health,
    test_non_finite_alpha_in_raw_json_is_refused,
    test_seeded_sampling_is_reproducible_and_differs_across_seeds,
    test_streaming_sends_the_non_streaming_text_in_openai_chunks,
    test_the_api_key_is_required_everywhere_but_health,
)

REPLICA_CPUS = 0.5  # two apps of two replicas fit Ray's two CPUs
DEADLINE = 120  # seconds for anything that waits on Ray: past it, the test fails instead of hanging


@pytest.fixture(scope="session", params=["llama"])
def tiny_model_dir(tiny_model_dir):
    """Only the Llama of conftest's two tiny models: Ray's routing does not depend on it (test_serve runs both)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def ray_home(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-home")


@pytest.fixture(autouse=True)
def isolated_home(ray_home, monkeypatch):
    """One GRAINS_EDGE_HOME for the module, the replicas' too: profiles saved here are theirs."""
    monkeypatch.setenv("GRAINS_EDGE_HOME", str(ray_home))


@pytest.fixture(scope="module")
def ray_proxy() -> str:
    """A local Ray instance of two CPUs with Serve's HTTP proxy on a free loopback port; its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=ray_app.QUIET)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def run_app(proxy: str, name: str, export_dir, ray_home, **options) -> Endpoint:
    """Two replicas of `export_dir` as the Ray app `name` under /name; its endpoint once both serve."""
    settings = ray_app.ReplicaSettings(str(export_dir), str(ray_home), options, "cpu", REPLICA_CPUS)
    serve.run(ray_app.application(settings, ray_app.Scale(2, 2)), name=name, route_prefix=f"/{name}")
    return Endpoint(f"{proxy}/{name}")


@pytest.fixture(scope="module")
def live(ray_proxy, tiny_export, ray_home):
    """The `live` server of test_serve.py's tests, as two Ray replicas (no logits hook: it is in their process)."""
    yield run_app(ray_proxy, "tiny", tiny_export, ray_home, max_batch=8, max_body=64 * 1024, api_key=KEY), None
    serve.delete("tiny")


@pytest.fixture(scope="module")
def default_app(ray_proxy, default_export, ray_home) -> Endpoint:
    return run_app(ray_proxy, "default", default_export, ray_home, max_batch=4, api_key=KEY)


def replica(response: httpx.Response) -> str:
    name = response.headers[ray_app.REPLICA_HEADER]
    assert name.startswith("SERVE_REPLICA::")
    return name


def chat(endpoint: Endpoint, content: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
    return endpoint.post("/v1/chat/completions", {**body, **extra}, timeout=DEADLINE)


def until(condition, what: str):
    """Poll `condition` until it returns something truthy, for at most DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {DEADLINE} s"
        time.sleep(0.5)
    return result


def test_requests_land_on_both_replicas(default_app):
    """Rounds of 8 concurrent requests until both replicas have answered (Ray's router picks by load, so one
    round may all go to one replica); every answer is complete."""
    seen = set()

    def both_answered() -> bool:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: chat(default_app, f"Count to {i}."), range(8)))
        assert all(a.status_code == 200 and a.json()["choices"][0]["message"]["content"] for a in answers)
        seen.update(replica(answer) for answer in answers)
        return len(seen) == 2

    until(both_answered, "answers from both replicas")


@pytest.fixture
def added_profile(default_export):
    """A user profile for the default model, saved while the replicas run (removed after: the tiny app lists it)."""
    manifest = Manifest.load(default_export)
    vectors = np.random.default_rng(0).normal(0, 1, (manifest.num_layers, manifest.hidden_size))  # [layers, hidden]
    profile = Profile("added-live", vectors.astype(np.float32), [10], 0.01, "mean-diff", {"description": "mid-run"})
    path = save_profile(profile, paths.profiles_dir() / "added-live.safetensors")
    yield profile
    path.unlink()


def test_a_profile_saved_while_serving_is_listed_by_every_replica(default_app, added_profile):
    listings = {}

    def both_listed() -> bool:
        response = httpx.get(f"{default_app.url}/v1/steering/profiles", headers={"Authorization": f"Bearer {KEY}"})
        listings[replica(response)] = response.json()
        return len(listings) == 2

    until(both_listed, "an answer from each replica")
    first, second = listings.values()
    assert first == second
    added = next(p for p in first["data"] if p["name"] == "added-live")
    assert added["fits"] and not added["builtin"] and added["metadata"]["description"] == "mid-run"
    steered = chat(default_app, "Hi", steering={"profile": "added-live"})
    assert steered.json()["steering"] == {"profile": "added-live", "alpha": 0.01}


def stream_on(endpoint: Endpoint, started: list, tokens: int) -> dict:
    """One streamed chat answer of `tokens` tokens; its replica goes into `started` once a piece has arrived."""
    body = {
        "messages": HELLO,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    outcome = {"pieces": 0, "done": False, "tokens": None}
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        url = f"{endpoint.url}/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=DEADLINE) as response:
            outcome["replica"] = replica(response)
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    outcome["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line.removeprefix("data: "))
                    if chunk.get("usage"):
                        outcome["tokens"] = chunk["usage"]["completion_tokens"]
                    elif chunk["choices"][0]["delta"].get("content"):
                        outcome["pieces"] += 1
                        started.append(outcome["replica"])
    except httpx.TransportError as error:  # the proxy cut the stream: the replica is gone
        outcome["cut"] = repr(error)
    return outcome


def test_a_replica_killed_mid_load_is_replaced_and_nothing_hangs(default_app):
    tokens = 48
    started: list[str] = []
    with ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(stream_on, default_app, started, tokens) for _ in range(4)]
        raw = [pool.submit(chat, default_app, f"Say {i} words.", tokens, ignore_eos=True) for i in range(3)]
        retried = [  # the openai client retries a 5xx by itself (max_retries 2)
            pool.submit(
                default_app.client(max_retries=2).chat.completions.create,
                model="m",
                messages=HELLO,
                max_tokens=tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            for _ in range(3)
        ]
        victim = until(lambda: started and started[0], "a first streamed piece")
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        outcomes = [future.result(timeout=DEADLINE) for future in streams]
        statuses = [future.result(timeout=DEADLINE).status_code for future in raw]
        answers = [future.result(timeout=DEADLINE) for future in retried]
    on_victim = [o for o in outcomes if o["replica"] == victim]
    assert on_victim and all("cut" in o and not o.get("done") for o in on_victim)
    assert all(o["done"] and o["tokens"] == tokens for o in outcomes if o["replica"] != victim)
    assert all(status in (200, 500) for status in statuses)  # 500: Ray's proxy for a request on the dead replica
    assert all(answer.usage.completion_tokens == tokens for answer in answers)

    def replaced() -> set[str]:
        seen = {replica(chat(default_app, "Hi", 2)) for _ in range(4)}
        states = serve.status().applications["default"].deployments["GrainsEdge"].replica_states
        return seen - {victim} if states == {"RUNNING": 2} and len(seen - {victim}) == 2 else set()

    assert victim not in until(replaced, "a new replica answering beside the survivor")
    later = [chat(default_app, "Name a colour.") for _ in range(4)]
    assert all(answer.status_code == 200 for answer in later)


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--replicas", "2"], "are Ray's; fix: add --ray"),
        (["--ray", "--replicas", "2", "--autoscale", "1:3"], "exclude each other"),
        (["--ray", "--replicas", "0"], "at least 1"),
        (["--ray", "--autoscale", "3:1"], "MIN:MAX"),
        (["--ray", "--autoscale", "x"], "MIN:MAX"),
        (["--ray", "--replica-cpus", "0"], "above 0"),
        (["--ray", "--profile", "nope"], "unknown profile 'nope'"),
    ],
)
def test_bad_ray_flags_are_one_line_errors_before_ray_starts(capsys, monkeypatch, tiny_export, flags, problem):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # were Ray reached, this would fail otherwise
    assert main(["serve", "--model", str(tiny_export), "--port", "1", *flags]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and problem in error[0] and "fix:" in error[0]


def test_a_busy_port_is_said_before_a_local_ray_starts(capsys, monkeypatch, tiny_export):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    taken = listen("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        assert main(["serve", "--ray", "--model", str(tiny_export), "--port", port]) == 2
    finally:
        taken.close()
    assert "cannot listen" in capsys.readouterr().err


def test_without_ray_the_flag_names_the_extra(capsys, monkeypatch, tiny_export):
    monkeypatch.setitem(sys.modules, "ray", None)  # Python now finds no ray, as where it is not installed
    assert main(["serve", "--ray", "--model", str(tiny_export)]) == 2
    assert "pip install 'grains-edge[cluster]'" in capsys.readouterr().err


def test_more_replicas_than_the_local_ray_holds_is_a_one_line_error(ray_proxy):
    ray_app.check_room(ray_app.Scale(4, 4), REPLICA_CPUS, 0)  # 2 CPUs: exactly room
    with pytest.raises(GrainsError, match="3 replicas × 1 CPU = 3, the Ray cluster has 2"):
        ray_app.check_room(ray_app.Scale(3, 3), 1.0, 0)
    with pytest.raises(
        GrainsError, match="1 replicas × 1 GPU = 1, the Ray cluster has 0; fix: fewer replicas, or --device cpu"
    ):
        ray_app.check_room(ray_app.parse_scale(None, "0:2"), REPLICA_CPUS, 1)


def test_scales():
    assert ray_app.parse_scale(None, None) == ray_app.Scale(1, 1)
    assert ray_app.parse_scale(3, None) == ray_app.Scale(3, 3) and ray_app.parse_scale(3, None).fixed
    assert ray_app.parse_scale(None, "0:4") == ray_app.Scale(0, 4) and not ray_app.parse_scale(None, "0:4").fixed
