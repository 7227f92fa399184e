import numpy as np
import pytest

from grains_edge.errors import GrainsError
from grains_edge.evaluate.scoring import (
    ABItem,
    MCItem,
    NonFiniteScores,
    ab_preference,
    answer_logprobs,
    bootstrap_interval,
    fitting,
    perplexity,
    truthfulqa,
)
from grains_edge.runtime.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_export) -> Engine:
    return Engine(tiny_export, device="cpu")


def manual_logprob(engine: Engine, prompt: str, answer: str, steering=None) -> float:
    prompt_ids = engine.chat_ids([{"role": "user", "content": prompt}])
    answer_ids = engine.tokenizer.encode(answer, add_special_tokens=False)
    ids = np.array([prompt_ids + answer_ids])
    logits = engine.forward(ids, np.ones_like(ids), steering)[0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return sum(log_probs[len(prompt_ids) - 1 + i, t] for i, t in enumerate(answer_ids))


def test_batched_scores_equal_one_sequence_at_a_time(engine):
    prompts = ["Hello, how are you today?", "The capital of France is", "Hello, how are you today?"]
    answers = ["I am fine, thank you!", "Paris.", "Steering vectors"]
    steering = np.full((engine.num_layers, engine.hidden_size), 0.3, np.float32)
    scores, counts = answer_logprobs(engine, prompts, answers, steering)
    expected = [manual_logprob(engine, p, a, steering) for p, a in zip(prompts, answers, strict=True)]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert counts.tolist() == [len(engine.tokenizer.encode(a, add_special_tokens=False)) for a in answers]


def test_truthfulqa_mc1_follows_the_highest_scored_choice(engine):
    choices = ["Paris.", "Steering vectors change what a language model says.", "Hello"]
    scores, _ = answer_logprobs(engine, ["Q?"] * 3, choices)
    best = int(np.argmax(scores))
    right = MCItem("Q?", choices, [int(i == best) for i in range(3)])
    wrong = MCItem("Q?", choices, [int(i != best) for i in range(3)])
    assert truthfulqa(engine, [right, wrong], [right])["mc1"] == 0.5
    result = ab_preference(engine, [ABItem("Q?", choices[best], choices[(best + 1) % 3])])
    assert result["matching_rate"] == 1.0


def test_bootstrap_interval_brackets_the_mean():
    values = np.random.default_rng(0).random(200)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and high - low < 0.2


def test_perplexity_change_is_the_ratio_of_the_two_runs_with_a_paired_interval(engine):
    prompts = [f"Tell me about item {i}." for i in range(12)]
    responses = [f"Item {i} is a thing with {i} parts and a name." for i in range(12)]
    steering = np.full((engine.num_layers, engine.hidden_size), 0.5, np.float32)
    result = perplexity(engine, prompts, responses, steering, against_unsteered=True)
    steered, unsteered = perplexity(engine, prompts, responses, steering), perplexity(engine, prompts, responses)
    assert result["perplexity"] == pytest.approx(steered["perplexity"])
    assert result["unsteered_perplexity"] == pytest.approx(unsteered["perplexity"])
    assert result["perplexity_change"] == pytest.approx(steered["perplexity"] / unsteered["perplexity"] - 1)
    low, high = result["perplexity_change_ci95"]
    assert result["perplexity_change"] != 0 and low < result["perplexity_change"] < high
    assert "perplexity_change" not in perplexity(engine, prompts, responses, None, against_unsteered=True)


def test_ab_change_is_steered_minus_unsteered_per_item_with_flip_counts(engine):
    items = [ABItem(f"Question {i}?", f"Yes, {i} is right.", f"No, {i} is wrong.") for i in range(10)]
    steering = np.full((engine.num_layers, engine.hidden_size), 0.5, np.float32)
    result = ab_preference(engine, items, steering, against_unsteered=True)
    steered, unsteered = ab_preference(engine, items, steering), ab_preference(engine, items)
    assert result["unsteered_matching_rate"] == unsteered["matching_rate"]
    assert result["matching_rate_change"] == pytest.approx(steered["matching_rate"] - unsteered["matching_rate"])
    assert result["flipped_to_matching"] - result["flipped_away"] == round(10 * result["matching_rate_change"])
    margin_change = steered["mean_logprob_margin"] - unsteered["mean_logprob_margin"]
    assert result["margin_change"] == pytest.approx(margin_change) and margin_change != 0
    low, high = result["margin_change_ci95"]
    assert low <= result["margin_change"] <= high
    assert "margin_change" not in ab_preference(engine, items, None, against_unsteered=True)


def test_truthfulqa_change_is_steered_minus_unsteered_per_question(engine):
    items = [MCItem(f"Question {i}?", [f"Yes, {i}.", f"No, not {i}.", "Maybe."], [1, 0, 0]) for i in range(8)]
    steering = np.full((engine.num_layers, engine.hidden_size), 0.5, np.float32)
    result = truthfulqa(engine, items, items, steering, against_unsteered=True)
    steered, unsteered = truthfulqa(engine, items, items, steering), truthfulqa(engine, items, items)
    for name in ("mc1", "mc2"):
        assert result[name] == steered[name] and result[f"unsteered_{name}"] == unsteered[name]
        assert result[f"{name}_change"] == pytest.approx(steered[name] - unsteered[name])
        low, high = result[f"{name}_change_ci95"]
        assert low <= result[f"{name}_change"] <= high
    assert result["mc2_change"] != 0
    assert "mc1_change" not in truthfulqa(engine, items, items, None, against_unsteered=True)


# ---- no number unless it is finite; no allocation for a sequence the context cannot hold --------------------

MC = [MCItem(f"Question {i}?", [f"Yes, {i}.", f"No, not {i}."], [1, 0]) for i in range(3)]
AB = [ABItem(f"Question {i}?", f"Yes, {i} is right.", f"No, {i} is wrong.") for i in range(3)]
PROMPTS, RESPONSES = ["Say hello.", "Name a city."], ["Hello there!", "Paris."]


def every_metric(engine, steering):
    """Each metric on a few items, paired against the unsteered model."""
    return [
        lambda: truthfulqa(engine, MC, MC, steering, against_unsteered=True),
        lambda: ab_preference(engine, AB, steering, against_unsteered=True),
        lambda: perplexity(engine, PROMPTS, RESPONSES, steering, against_unsteered=True),
    ]


def test_nan_steering_is_an_error_naming_the_profile_not_a_nan_result(engine):
    steering = np.full((engine.num_layers, engine.hidden_size), np.nan, np.float32)
    for metric in every_metric(engine, steering):
        with pytest.raises(NonFiniteScores, match="fix: rebuild the profile"):
            metric()


def test_non_finite_logits_are_an_error_naming_the_likely_cause(engine, monkeypatch):
    forward = engine.forward

    def poisoned(ids, mask, steering=None):
        logits = forward(ids, mask, steering)
        logits[:, :, 5] = np.inf if steering is None else np.nan
        return logits

    monkeypatch.setattr(engine, "forward", poisoned)
    for metric in every_metric(engine, None):
        with pytest.raises(NonFiniteScores, match="unsteered model's scores are not finite: the export is damaged"):
            metric()
    steering = np.full((engine.num_layers, engine.hidden_size), 0.1, np.float32)
    for metric in every_metric(engine, steering):
        with pytest.raises(NonFiniteScores, match="steered model's scores are not finite: .*fix: lower --alpha"):
            metric()


def test_a_perplexity_that_overflows_is_an_error_not_inf(engine, monkeypatch):
    def certain_of_token_zero(ids, mask, steering=None):  # every answer token gets log p = -1e5
        logits = np.zeros((*ids.shape, engine.manifest.vocab_size), np.float32)
        logits[:, :, 0] = 1e5
        return logits

    monkeypatch.setattr(engine, "forward", certain_of_token_zero)
    with pytest.raises(NonFiniteScores, match="'perplexity' came out inf"):
        perplexity(engine, PROMPTS, RESPONSES)


def test_no_items_is_an_error_not_a_score(engine):
    for metric in (
        lambda: truthfulqa(engine, [], []),
        lambda: ab_preference(engine, []),
        lambda: perplexity(engine, [], []),
    ):
        with pytest.raises(GrainsError, match="to score; fix:"):
            metric()


def test_too_long_items_are_refused_before_allocation_and_fitting_leaves_them_out(engine, monkeypatch):
    long_response = " ".join(["Steering vectors change what a language model says."] * 40)
    prompts, responses = [*PROMPTS, "Say it all."], [*RESPONSES, long_response]
    assert len(engine.tokenizer.encode(long_response)) > engine.max_context
    short = perplexity(engine, PROMPTS, RESPONSES)
    kept, skipped = fitting(engine, list(zip(prompts, responses, strict=True)), lambda item: [item])
    assert skipped == 1 and kept == list(zip(PROMPTS, RESPONSES, strict=True))

    def no_forward(*_args):
        raise AssertionError("forward ran on a sequence longer than the context")

    monkeypatch.setattr(engine, "forward", no_forward)
    with pytest.raises(
        GrainsError,
        match=f"1 prompt\\+answer sequences are longer than the model's context .* > {engine.max_context} tokens",
    ):
        perplexity(engine, prompts, responses)
    monkeypatch.undo()
    assert perplexity(engine, [p for p, _ in kept], [r for _, r in kept]) == short


def test_a_larger_vocabulary_gets_fewer_tokens_per_pass_and_the_same_scores(engine, monkeypatch):
    from grains_edge.evaluate import scoring

    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    answers = [f"It is {2 * i}." for i in range(6)]
    whole, _ = scoring.answer_logprobs(engine, prompts, answers)
    widths = []
    forward = engine.forward
    monkeypatch.setattr(
        engine, "forward", lambda ids, mask, steering=None: widths.append(ids.size) or forward(ids, mask, steering)
    )
    monkeypatch.setattr(scoring, "BATCH_LOGITS", 100 * engine.manifest.vocab_size)  # 100 tokens: two rows
    bounded, _ = scoring.answer_logprobs(engine, prompts, answers)
    assert len(widths) > 1 and max(widths) <= 100
    np.testing.assert_allclose(bounded, whole, rtol=1e-4)
