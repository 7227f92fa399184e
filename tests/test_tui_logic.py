"""The chat's logic without a screen: steering choices, prompt fitting, interleaved answers."""

import threading

import numpy as np
import pytest

from grains_edge.errors import GrainsError
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.steer.profiles import steering_tensor
from grains_edge.tui.generation import fit_prompt, interleave
from grains_edge.tui.steering import ALPHA_LIMIT, ProfileLibrary, Steering, alpha_step, format_alpha
from tests.fake_engine import HIDDEN, LAYERS, PROFILES, FakeEngine, fake_profile


def library() -> ProfileLibrary:
    shelf = ProfileLibrary((LAYERS, HIDDEN), source=lambda: PROFILES)
    shelf.refresh()
    return shelf


@pytest.mark.parametrize(
    "steering",
    [Steering(), Steering("truthful", 0.6), Steering("truthful", -0.25, "concise", 0.3)],
)
def test_steering_survives_the_message_columns(steering):
    assert Steering.from_record(*steering.to_record()) == steering


def test_steering_labels_and_steps():
    assert Steering().label == "none"
    assert Steering("truthful", 0.6, "concise", 0.3).label == "truthful α0.60 + concise α0.30"
    assert Steering("truthful", 0.6).stepped(1).alpha == 0.65
    assert Steering("truthful", 0.6).stepped(-2).alpha == 0.5
    assert Steering("truthful", ALPHA_LIMIT).stepped(5).alpha == ALPHA_LIMIT
    assert Steering("truthful", 0.01).stepped(3, alpha_step(0.01)).alpha == 0.013
    assert Steering("truthful", 0.0125).label == "truthful α0.0125"


@pytest.mark.parametrize(
    ("default_alpha", "step"), [(0.6, 0.05), (0.5, 0.05), (1.0, 0.1), (0.01, 0.001), (0.03, 0.002), (0.0, 0.05)]
)
def test_a_key_press_moves_alpha_by_about_a_tenth_of_the_profile_default(default_alpha, step):
    assert alpha_step(default_alpha) == pytest.approx(step)


def test_signed_alpha_format():
    assert [format_alpha(a, signed=True) for a in (0.6, -0.25, 0.0125, 0.0)] == ["+0.60", "-0.25", "+0.0125", "+0.00"]


def test_library_builds_single_mixed_and_no_steering():
    shelf = library()
    assert shelf.tensor(Steering()) is None
    assert shelf.chosen("truthful") == Steering("truthful", 0.6)  # the profile's own strength
    assert shelf.chosen("truthful", 0.2) == Steering("truthful", 0.2)
    np.testing.assert_allclose(shelf.tensor(Steering("truthful", 0.2)), steering_tensor(PROFILES[0], 0.2))
    mixed = shelf.tensor(Steering("truthful", 0.2, "formal", -0.5))
    np.testing.assert_allclose(mixed, steering_tensor(PROFILES[0], 0.2) + steering_tensor(PROFILES[2], -0.5))


def test_library_refuses_unknown_profiles_and_other_models(tmp_path):
    shelf = library()
    with pytest.raises(GrainsError, match="unknown profile 'nope'"):
        shelf.get("nope")
    wrong = fake_profile("wide", 1)
    wrong.vectors = np.ones((LAYERS, HIDDEN * 2), np.float32)
    shelf.profiles["wide"] = wrong
    assert not shelf.fits(wrong)
    with pytest.raises(GrainsError, match="another model"):
        shelf.get("wide")


def test_library_goes_through_the_one_strength_rule_and_warns_once_about_other_weights(monkeypatch, capsys):
    from dataclasses import replace

    from grains_edge.steer import profiles

    monkeypatch.setattr(profiles.warn_once, "shown", set())
    other = replace(fake_profile("other", 1), metadata={"fingerprint": "bbbb"})
    shelf = ProfileLibrary((LAYERS, HIDDEN), source=lambda: [*PROFILES, other], fingerprint="aaaa")
    shelf.refresh()
    for _ in range(2):
        mixed = shelf.tensor(Steering("truthful", 0.2, "other", 0.3))
    np.testing.assert_array_equal(mixed, profiles.combine([(PROFILES[0], 0.2), (other, 0.3)]))
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and "profile 'other' was built for other weights" in warned[0]
    with pytest.raises(GrainsError, match="finite"):
        shelf.tensor(Steering("truthful", float("nan")))


def test_fit_prompt_drops_the_oldest_turns_and_keeps_the_last():
    engine = FakeEngine(max_context=60)
    history = []
    for index in range(6):
        history += [
            {"role": "user", "content": f"question {index} " + "x " * 5},
            {"role": "assistant", "content": "answer " * 6},
        ]
    history.append({"role": "user", "content": "last question"})
    ids, dropped = fit_prompt(engine, history, "Be brief.", max_new_tokens=20)
    assert dropped > 0 and dropped % 2 == 0  # whole turns: the kept part starts with the user
    assert len(ids) + 20 <= 60
    assert ids.messages[0] == {"role": "system", "content": "Be brief."}
    assert ids.messages[1]["role"] == "user" and ids.messages[-1]["content"] == "last question"
    ids, dropped = fit_prompt(engine, [{"role": "user", "content": "y " * 100}], "", max_new_tokens=20)
    assert dropped == 0 and len(ids) > 60  # too long alone: left for the engine to refuse


def test_interleave_alternates_answers_and_keeps_each_ones_stats():
    replies = {None: "a b c d", 1: "one two"}
    engine = FakeEngine(lambda messages, steering: replies[None if steering is None else 1])
    pieces = []
    steering = np.ones((LAYERS, HIDDEN), np.float32)
    stats = interleave(
        engine, [1, 2, 3], [None, steering], GenerationSettings(), threading.Event(), lambda i, p: pieces.append((i, p))
    )
    assert pieces == [(0, "a"), (1, "one"), (0, " b"), (1, " two"), (0, " c"), (0, " d")]
    assert [s.new_tokens for s in stats] == [4, 2]
    assert engine.calls[0].steering is None and engine.calls[1].steering is not None


def test_interleave_stops_both_answers():
    engine = FakeEngine(lambda messages, steering: "word " * 50)
    stop = threading.Event()

    def on_piece(index, piece):
        if index == 1:
            stop.set()

    stats = interleave(engine, [1], [None, None], GenerationSettings(), stop, on_piece)
    assert [s.stopped_by for s in stats] == ["user", "user"]
    assert all(s.new_tokens <= 2 for s in stats)
