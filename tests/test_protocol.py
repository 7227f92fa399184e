"""Both engines, the ONNX Runtime one and the tests' fake, implement the chat's contract (runtime/protocol.py)."""

import inspect

import pytest

from grains_edge.runtime.engine import Engine
from grains_edge.runtime.protocol import ChatEngine
from tests.fake_engine import FakeEngine

CALLS = [name for name, member in vars(ChatEngine).items() if inspect.isfunction(member) and not name.startswith("_")]


@pytest.fixture(params=["onnxruntime", "fake"])
def engine(request, tiny_export):
    return Engine(tiny_export, device="cpu") if request.param == "onnxruntime" else FakeEngine()


def test_an_engine_has_every_member_of_the_protocol(engine):
    assert isinstance(engine, ChatEngine)
    assert CALLS == ["zero_steering", "chat_ids", "generate", "chat"]


@pytest.mark.parametrize("name", CALLS)
def test_an_engine_takes_the_protocols_arguments(engine, name):
    wanted = inspect.signature(getattr(ChatEngine, name)).parameters
    given = inspect.signature(getattr(type(engine), name)).parameters
    assert list(given) == list(wanted)
    assert [p.default for p in given.values()] == [p.default for p in wanted.values()]


def test_the_engines_answer_the_same_shapes(tiny_export):
    real, fake = Engine(tiny_export, device="cpu"), FakeEngine()
    for engine in (real, fake):
        assert engine.zero_steering().shape == (engine.num_layers, engine.hidden_size)
        ids = engine.chat_ids([{"role": "user", "content": "Hello there"}])
        assert all(isinstance(i, int) for i in ids) and 0 < len(ids) < engine.max_context
        pieces = list(engine.generate(ids, None, None))
        assert all(isinstance(piece, str) for piece in pieces)
        assert engine.last_stats.prompt_tokens == len(ids)
