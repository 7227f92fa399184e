"""The ORT engine: decoding, steering per call, streaming, limits."""

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grains_edge.errors import GrainsError
from grains_edge.runtime.engine import Engine, draw, nucleus, pick_token
from grains_edge.runtime.protocol import GenerationSettings
from grains_edge.steer.profiles import Profile, steering_tensor

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def engine(tiny_export) -> Engine:
    return Engine(tiny_export, device="cpu")


def tokens(engine: Engine, steering=None, **settings) -> list[str]:
    return list(engine.chat(HELLO, steering, GenerationSettings(**{"max_new_tokens": 12, **settings})))


def test_greedy_is_deterministic_and_streams_pieces(engine):
    first = tokens(engine)
    assert len(first) > 1 and first == tokens(engine)
    assert engine.last_stats.new_tokens >= len(first)
    assert engine.last_stats.prompt_tokens == len(engine.chat_ids(HELLO))


def test_zero_steering_reproduces_unsteered_tokens(engine):
    assert tokens(engine, engine.zero_steering()) == tokens(engine, None)


def test_steering_changes_the_answer_and_switching_back_restores_it(engine):
    plain = tokens(engine)
    push = engine.zero_steering()
    push[1:3] = np.random.default_rng(0).normal(0, 30, (2, engine.hidden_size))
    assert tokens(engine, push) != plain
    assert tokens(engine, None) == plain


def test_a_profile_at_twice_its_alpha_is_a_hand_built_batch_row(engine):
    """profiles.steering_tensor at 2α, run alone, gives the logits of a batch row steered by 2·α·v written by
    hand, beside an unsteered row that stays unsteered."""
    vectors = np.random.default_rng(1).normal(0, 5, (engine.num_layers, engine.hidden_size)).astype(np.float32)
    profile = Profile("push", vectors, layers=[1, 2], alpha=0.5, method="test")
    ids = np.array([[5, 6, 7, 8, 9]] * 2)
    mask = np.ones_like(ids)
    by_hand = np.zeros((2, engine.num_layers, engine.hidden_size), np.float32)  # [batch, layers, hidden]
    by_hand[0, 1:3] = 2 * 0.5 * vectors[1:3]
    batched = engine.forward(ids, mask, by_hand)
    alone = engine.forward(ids[:1], mask[:1], steering_tensor(profile, 2 * profile.alpha))[0]
    plain = engine.forward(ids[:1], mask[:1])[0]
    np.testing.assert_allclose(batched[0], alone, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batched[1], plain, rtol=1e-4, atol=1e-4)
    assert np.abs(alone - plain).max() > 1e-2  # the steering matters


def test_seeded_sampling_is_reproducible(engine):
    a = tokens(engine, temperature=1.0, top_p=0.9, seed=7)
    assert a == tokens(engine, temperature=1.0, top_p=0.9, seed=7)


def full_sort_nucleus(weights: np.ndarray, top_p: float) -> set[int]:
    """The nucleus by a sort of the whole vocabulary (the rule before the partial search)."""
    probs = weights / weights.sum(dtype=np.float64)
    order = np.argsort(-probs)
    return set(order[np.cumsum(probs[order]) - probs[order] < top_p].tolist())


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])  # flat (the nucleus is most of the vocabulary) .. peaked
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_is_the_full_sort_s(spread, top_p):
    logits = np.random.default_rng(int(spread * 10)).normal(size=5000) * spread
    weights = np.exp(logits - logits.max()).astype(np.float32)
    found = nucleus(weights, top_p)
    assert set(found.tolist()) == full_sort_nucleus(weights, top_p)
    assert (np.diff(weights[found]) <= 0).all()  # most probable first


def test_draw_follows_the_weights_across_blocks_and_never_picks_a_zero():
    weights = np.random.default_rng(1).random(700).astype(np.float32)  # two whole blocks of 256 and a tail
    weights[::3] = 0
    weights[650] = 40.0  # in the tail
    rng = np.random.default_rng(2)
    counts = np.bincount([draw(weights, rng) for _ in range(40000)], minlength=700)
    expected = 40000 * weights / weights.sum(dtype=np.float64)
    assert counts[weights == 0].sum() == 0
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected.max()) + 5  # within sampling noise


def test_sampled_tokens_follow_the_softmax_at_the_temperature():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))  # temperature 1: these probabilities
    rng = np.random.default_rng(3)
    picks = [pick_token(logits, GenerationSettings(temperature=1.0), rng) for _ in range(20000)]
    np.testing.assert_allclose(np.bincount(picks, minlength=4) / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    nucleus_picks = {pick_token(logits, GenerationSettings(temperature=1.0, top_p=0.7), rng) for _ in range(2000)}
    assert nucleus_picks == {0, 1}  # 0.5 before the second, 0.8 before the third
    assert {pick_token(logits, GenerationSettings(temperature=1e-40), rng) for _ in range(50)} == {0}  # as greedy


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_an_error_not_a_token(bad, temperature):
    logits = np.zeros(300, np.float32)
    logits[123] = bad
    with pytest.raises(GrainsError, match="non-finite logits.*fix:"):
        pick_token(logits, GenerationSettings(temperature=temperature), np.random.default_rng(0))


def test_repetition_penalty_follows_the_ctrl_rule():
    logits = np.array([2.0, -1.0, 1.0, 0.5], np.float32)
    seen = np.array([True, True, False, False])
    rng = np.random.default_rng(0)
    assert pick_token(logits, GenerationSettings(), rng, seen) == 0  # 1 = off
    assert pick_token(logits, GenerationSettings(repetition_penalty=2.5), rng, seen) == 2  # 2 / 2.5 < 1
    negative = np.array([-1.0, -3.0])
    assert pick_token(negative, GenerationSettings(repetition_penalty=4.0), rng, np.array([True, False])) == 1
    assert logits[0] == 2.0  # the caller's logits are untouched


def test_repetition_penalty_changes_a_looping_greedy_answer(engine):
    plain = "".join(tokens(engine, max_new_tokens=30))
    assert "".join(tokens(engine, max_new_tokens=30, repetition_penalty=1.5)) != plain


def test_stop_event_ends_generation_early(engine):
    stop = threading.Event()
    stream = engine.chat(HELLO, None, GenerationSettings(max_new_tokens=50), stop)
    next(stream)
    stop.set()
    rest = list(stream)
    assert len(rest) <= 1 and engine.last_stats.stopped_by == "user"


def test_batched_forward_with_right_padding_matches_single_rows(engine):
    a, b = engine.chat_ids(HELLO), engine.chat_ids([{"role": "user", "content": "Paris"}])
    width = max(len(a), len(b))
    ids = np.full((2, width), engine.pad_id)
    mask = np.zeros((2, width), np.int64)
    for row, seq in enumerate((a, b)):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    batched = engine.forward(ids, mask)
    single = engine.forward(np.array([b]), np.ones((1, len(b)), np.int64))
    np.testing.assert_allclose(batched[1, : len(b)], single[0], atol=1e-4)
    with pytest.raises(GrainsError, match="right-padded"):
        engine.forward(ids[:, ::-1], mask[:, ::-1])


def test_cached_steps_match_the_full_forward_pass(engine):
    """Prompt, decode steps (fixed-shape mask with zeros past the cache), a second prompt chunk, decode."""
    ids = engine.chat_ids(HELLO)
    steering = engine.batched_steering(np.full((engine.num_layers, engine.hidden_size), 0.5, np.float32), 1)
    full = engine.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), steering)[0]  # [seq, vocab]
    cache = engine.new_cache(1, len(ids) + 8)
    prefix = engine.step(np.array([ids[:-6]]), steering, cache)
    steps = [engine.step(np.array([[token]]), steering, cache)[0] for token in ids[-6:-4]]
    chunk = engine.step(np.array([ids[-4:-2]]), steering, cache)
    steps += [chunk[0]] + [engine.step(np.array([[token]]), steering, cache)[0] for token in ids[-2:]]
    np.testing.assert_allclose(prefix[0], full[-7], atol=1e-4)
    np.testing.assert_allclose(np.stack(steps), full[[-6, -5, -3, -2, -1]], atol=1e-4)


def test_wrong_steering_shape_is_a_clear_error(engine):
    with pytest.raises(GrainsError, match="steering has shape"):
        tokens(engine, np.zeros((3, 7), np.float32))


def test_context_overflow_is_a_clear_error(engine):
    with pytest.raises(GrainsError, match="context is 128"):
        list(engine.generate(list(range(5, 200)), None))


def test_generation_stops_at_the_context_limit(engine, monkeypatch):
    prompt = list(range(5, 125))
    monkeypatch.setattr(engine, "stop_ids", set())  # no end-of-sequence token can end it first
    list(engine.generate(prompt, None, GenerationSettings(max_new_tokens=50)))
    assert engine.last_stats.stopped_by == "length"
    assert engine.last_stats.new_tokens == engine.fit_context(prompt, 50) == engine.max_context - len(prompt)


@pytest.mark.slow
def test_default_model_answers_a_simple_question(default_export):
    engine = Engine(default_export, device="cpu")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    plain = "".join(engine.chat(question, None, GenerationSettings(max_new_tokens=20)))
    assert "Paris" in plain
    zero = "".join(engine.chat(question, engine.zero_steering(), GenerationSettings(max_new_tokens=20)))
    assert zero == plain


def test_a_fused_export_without_its_kernels_is_a_clear_error(tiny_export, tmp_path, monkeypatch):
    """An export made where grains-edge's kernels built, opened where they cannot be."""
    import shutil

    from grains_edge import kernels
    from grains_edge.export.manifest import Manifest

    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    manifest = Manifest.load(copy)
    manifest.kernels = "fused"
    manifest.save(copy / "manifest.json")
    monkeypatch.setattr(kernels, "header_dirs", lambda: [tmp_path])
    monkeypatch.setenv("GRAINS_EDGE_CACHE", str(tmp_path / "cache"))  # no build from an earlier test either
    with pytest.raises(GrainsError, match="no ONNX Runtime headers.*re-export .* with --kernels stock"):
        Engine(copy, device="cpu")


def truncate(name: str, keep: float):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def edit_manifest(**changes):
    def damage(folder):
        data = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**data, **changes}))

    return damage


def rename_first_past_input(folder):
    data = json.loads((folder / "manifest.json").read_text())
    data["input_names"][5] = "past.0.k"
    (folder / "manifest.json").write_text(json.dumps(data))


DAMAGES = {
    "model.onnx truncated": (truncate("model.onnx", 0.5), "model.onnx cannot be loaded \\(InvalidProtobuf"),
    "model.onnx empty": (truncate("model.onnx", 0), "model.onnx cannot be loaded"),
    "model.onnx.data truncated": (truncate("model.onnx.data", 0.5), "model.onnx cannot be loaded \\(Fail"),
    "model.onnx.data missing": (lambda f: (f / "model.onnx.data").unlink(), "model.onnx cannot be loaded"),
    "manifest num_layers": (edit_manifest(num_layers=5), "does not describe its graph \\(its inputs do not fit"),
    "manifest hidden_size": (edit_manifest(hidden_size=65), "steering is \\['batch', 4, 64\\] in the graph"),
    "manifest vocab_size": (edit_manifest(vocab_size=10), "logits is"),
    "manifest input names": (rename_first_past_input, "do not fit num_layers 4"),
    "manifest num_kv_heads": (edit_manifest(num_kv_heads=3), "past_key_values.0.key is"),
    "manifest not JSON": (lambda f: (f / "manifest.json").write_text('{"num_layers": 4,'), "damaged"),
    "manifest wrong type": (edit_manifest(num_layers="4"), "'num_layers' is not int"),
    "tokenizer.json garbage": (lambda f: (f / "tokenizer.json").write_text("<html>"), "tokenizer.json is damaged"),
    "tokenizer_config.json garbage": (lambda f: (f / "tokenizer_config.json").write_bytes(b"\xff\xfe"), "damaged"),
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_export_is_one_line_naming_it(tiny_export, tmp_path, damage):
    """Every way an export can be cut short or edited out of step with its graph: a GrainsError with the fix
    on load, the same one line through the CLI."""
    import shutil

    from grains_edge.cli import main

    copy = tmp_path / "export"
    shutil.copytree(tiny_export, copy)
    apply, message = DAMAGES[damage]
    apply(copy)
    with pytest.raises(GrainsError, match=message) as raised:
        Engine(copy, device="cpu")
    assert "fix:" in str(raised.value) and "\n" not in str(raised.value)
    assert main(["ask", "hello", "--model", str(copy), "--device", "cpu"]) == 2


MANIFEST_FIELDS = ["num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_context"]


@settings(max_examples=25, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(MANIFEST_FIELDS), st.integers(-2, 70), min_size=1, max_size=3))
def test_a_manifest_edited_out_of_step_with_its_graph_loads_right_or_is_one_error(
    tiny_export, tmp_path_factory, changes
):
    """Random edits of the manifest's dims: a GrainsError, or an engine that still answers."""
    import shutil

    copy = tmp_path_factory.mktemp("edited") / "export"
    shutil.copytree(tiny_export, copy)
    edit_manifest(**changes)(copy)
    try:
        pieces = list(Engine(copy, device="cpu").chat(HELLO, None, GenerationSettings(max_new_tokens=2)))
    except GrainsError as error:
        assert "fix:" in str(error)
        return
    assert all(isinstance(piece, str) for piece in pieces)
