import numpy as np
import pytest
import torch

from grains_edge.errors import GrainsError
from grains_edge.steer.vectors import (
    AGGREGATES,
    TokenPair,
    build,
    first_component,
    fitting_pairs,
    last_token_states,
    model_context,
    pair_length,
    per_layer,
    template_span,
    tokenize_pairs,
    top_positions,
)
from tests.conftest import tiny_model

PAIRS = [([1, 5, 9, 4], [20, 21, 22], [30, 31]), ([2, 6, 9], [23, 24], [33, 34, 35]), ([7, 3, 8, 8], [25], [36])]


def test_first_component_recovers_a_planted_direction_with_positive_sign():
    rng = np.random.default_rng(0)
    direction = torch.tensor(rng.normal(size=16), dtype=torch.float32)
    direction /= direction.norm()
    data = torch.tensor(rng.normal(size=(50, 1)) + 3, dtype=torch.float32) * direction + 0.05 * torch.randn(50, 16)
    assert float(first_component(data) @ direction) > 0.99
    assert float(first_component(-data) @ direction) < -0.99


def test_top_positions_keep_only_tokens_pushing_the_right_way():
    scores = torch.tensor([0.5, -2.0, 3.0, 0.0, -0.1])
    assert top_positions(scores, 2, +1.0) == [2, 0]
    assert top_positions(scores, 10, -1.0) == [1, 4]


def test_masking_changes_the_last_token_state_and_variant_zero_is_unmasked():
    model = tiny_model("llama", 64)
    states = last_token_states(model, [1, 2, 3, 4], [[0, 1]])
    plain = last_token_states(model, [1, 2, 3, 4])
    assert states.shape == (2, 4, 64)
    torch.testing.assert_close(states[0], plain[0])
    assert not torch.allclose(states[0], states[1])


@pytest.mark.parametrize("method", ["grains", "mean-diff", "pca-diff"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vectors_have_layer_shape_hidden_norm_scale_and_are_deterministic(method, arch):
    model = tiny_model(arch, 64)
    first = build(model, PAIRS, method, k=2, steps=4)
    assert first.shape == (4, 64) and first.dtype == np.float32
    states = torch.stack([last_token_states(model, p + a)[0] for p, a, _ in PAIRS])
    np.testing.assert_allclose(np.linalg.norm(first, axis=-1), states.norm(dim=-1).mean(0).numpy(), rtol=1e-4)
    np.testing.assert_array_equal(first, build(model, PAIRS, method, k=2, steps=4))


def test_mean_diff_points_along_the_mean_difference():
    model = tiny_model("llama", 64)
    vectors = build(model, PAIRS, "mean-diff")
    differences = torch.stack(
        [last_token_states(model, p + a)[0] - last_token_states(model, p + b)[0] for p, a, b in PAIRS]
    ).mean(0)
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(vectors), differences, dim=-1)
    assert bool((cosine > 0.9999).all())


def test_template_span_is_the_shared_head_and_tail():
    empty = [1, 2, 3, 8, 9]
    assert template_span([1, 2, 3, 40, 41, 8, 9], empty) == (3, 2)
    assert template_span([1, 2, 3, 8, 9], empty) == (5, 0)  # nothing counted twice
    assert template_span([5, 6], empty) == (0, 0)


def test_tokenize_pairs_marks_the_chat_template(tiny_tokenizer):
    from grains_edge.evaluate.datasets import Pair

    (pair,) = tokenize_pairs(tiny_tokenizer, [Pair("Hello there", "Paris.", "London.")])
    head, tail = pair.template
    assert tiny_tokenizer.decode(pair.prompt[:head]) == "<|im_start|>user\n"
    assert tiny_tokenizer.decode(pair.prompt[head : len(pair.prompt) - tail]) == "Hello there"
    assert tiny_tokenizer.decode(pair.prompt[len(pair.prompt) - tail :]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(pair.preferred) == "Paris."


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grains_accepts_template_marked_pairs_deterministically(arch):
    model = tiny_model(arch, 64)
    marked = [TokenPair([1, 2] + p + [3], a, b, (2, 1)) for p, a, b in PAIRS]
    first = build(model, marked, "grains", k=2, steps=4, bfloat16=False)
    assert first.shape == (4, 64) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, build(model, marked, "grains", k=2, steps=4, bfloat16=False))


@pytest.mark.parametrize("aggregate", ["pc1", "centered-pc1", "mean"])
def test_attribution_cache_gives_the_same_vectors_and_skips_the_gradients(tmp_path, monkeypatch, aggregate):
    from grains_edge.steer import attribution

    model = tiny_model("llama", 64)
    direct = build(model, PAIRS, "grains", k=2, steps=4, bfloat16=False, aggregate=aggregate)
    cache = attribution.ScoreCache(tmp_path / "scores.npz", "tiny")
    cached = build(model, PAIRS, "grains", k=2, steps=4, bfloat16=False, aggregate=aggregate, cache=cache)
    np.testing.assert_array_equal(direct, cached)
    monkeypatch.setattr(attribution, "contrastive", lambda *args: pytest.fail("recomputed a cached attribution"))
    reloaded = attribution.ScoreCache(tmp_path / "scores.npz", "tiny")
    again = build(model, PAIRS, "grains", k=2, steps=4, bfloat16=False, aggregate=aggregate, cache=reloaded)
    np.testing.assert_array_equal(direct, again)


def test_aggregates_differ_and_are_unit_directions():
    deltas = torch.randn(20, 3, 8) + torch.tensor([1.0] * 8)
    results = {name: per_layer(combine, deltas) for name, combine in AGGREGATES.items()}
    for result in results.values():
        torch.testing.assert_close(result.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(results["pc1"], results["centered-pc1"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pairs_longer_than_the_context_are_refused_before_the_model_runs_or_left_out(arch):
    model = tiny_model(arch, 64)  # 128 positions
    long_pair = TokenPair([1, 2, 3], [5] * 126, [6])
    assert pair_length(long_pair) == 129 and model_context(model) == 128
    with pytest.raises(GrainsError, match="a pair has 129 tokens, the model's context is 128"):
        build(model, [*PAIRS, long_pair], "mean-diff")
    kept, skipped = fitting_pairs(model, [TokenPair(*pair) for pair in PAIRS] + [long_pair])
    assert skipped == 1 and kept == [TokenPair(*pair) for pair in PAIRS]
    with pytest.raises(GrainsError, match="all 1 pairs are longer than the model's context"):
        fitting_pairs(model, [long_pair])
