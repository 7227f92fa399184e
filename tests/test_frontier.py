"""The frontier search of `grains-edge tune`: bisection, cross-validated choice, resumed scoring, no report items."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from grains_edge.cli import main
from grains_edge.commands import tune
from grains_edge.evaluate import datasets, frontier
from grains_edge.evaluate.frontier_plot import envelope
from grains_edge.evaluate.resumed import ResumedScorer
from grains_edge.steer.profiles import load_profile
from tests.conftest import tiny_model


@pytest.mark.parametrize("limit", [0.013, 0.05, 0.2, 0.31])
def test_bisection_finds_the_largest_grid_alpha_within_budget(limit):
    low, high, steps = 0.01, 0.32, 4
    rise = lambda alpha: 0.03 * (alpha / limit) ** 2  # noqa: E731 (the budget is reached at `limit`)
    found, probes = frontier.largest_alpha(rise, 0.03, low, high, steps)
    # the other path: every point of the log grid bisection can reach, the largest one within budget
    grid = [low * (high / low) ** (i / 2**steps) for i in range(2**steps + 1)]
    assert found == pytest.approx(max(alpha for alpha in grid if rise(alpha) <= 0.03))
    assert len(probes) <= steps + 1 and all(rise(a) == r for a, r in probes.items())


def test_bisection_says_none_when_even_the_smallest_alpha_is_over_budget_and_high_when_all_pass():
    assert frontier.largest_alpha(lambda a: 1.0, 0.03, 0.01, 0.32, 3)[0] is None
    assert frontier.largest_alpha(lambda a: 0.0, 0.03, 0.01, 0.32, 3)[0] == 0.32
    assert frontier.largest_alpha(lambda a: math.inf if a > 0.1 else 0.0, 0.03, 0.01, 0.32, 5)[0] <= 0.1


def point(layers, alpha, rise, changes):
    return frontier.Point(layers, alpha, rise, np.asarray(changes, float))


def held_out_by_hand(points, k):
    """Cross-validation written out item by item, the second path to `frontier.cross_validated`."""
    count, total = len(points[0].changes), 0.0
    for item in range(count):
        training = [i for i in range(count) if i % k != item % k]
        best = sorted(points, key=lambda p: (-np.mean(p.changes[training]), p.ppl_rise))[0]
        total += best.changes[item]
    return total / count


def test_cross_validation_matches_the_item_by_item_count():
    rng = np.random.default_rng(1)
    points = [point("5", a, a, rng.integers(-1, 2, 23)) for a in (0.05, 0.1, 0.2)]
    for k in (2, 5):
        assert frontier.cross_validated(points, k) == pytest.approx(held_out_by_hand(points, k))


def test_choice_prefers_the_set_that_generalizes_and_breaks_ties_by_perplexity():
    steady = [point("3", 0.1, 0.02, [1, 0] * 10)]  # +0.5 on every fold
    lucky = [  # in sample α 0.2 wins (0.65), but each fold's winner loses on its held-out fold (2 folds: i mod 2)
        point("7", 0.1, 0.01, [1 if i % 2 == 0 or i in (1, 3) else 0 for i in range(20)]),
        point("7", 0.2, 0.02, [1 if i % 2 == 1 or i in (0, 2, 4) else 0 for i in range(20)]),
    ]
    chosen, scores = frontier.choose(steady + lucky, k=2)
    assert max(p.behaviour for p in lucky) == 0.65 and scores == {"3": 0.5, "7": 0.25} and chosen.layers == "3"
    cheap = [point("9", 0.1, 0.01, [1, 0] * 10)]  # the same score as "3" at a smaller perplexity cost
    assert frontier.choose(steady + cheap, k=2)[0].layers == "9"
    over = [point("1", 0.5, 0.5, [1] * 20)]
    over[0].admissible = False
    assert frontier.choose(over, k=2) == (None, {})


def test_the_default_family_covers_singles_pairs_and_windows():
    sets = frontier.layer_sets(30)
    sizes = {len(tune_layers(spec)) for spec in sets}
    assert sizes == {1, 2, 3, 5} and len(sets) == len(set(sets))
    singles = [int(spec) for spec in sets if spec.isdigit()]
    assert min(singles) < 10 and max(singles) > 20


def tune_layers(spec):
    from grains_edge.layers import parse_layers

    return parse_layers(spec, 30)


def test_envelope_keeps_the_points_no_cheaper_point_beats():
    assert envelope([(2, 1), (1, 2), (3, 3), (0, 0)]) == [(0, 0), (1, 2), (3, 3)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resumed_passes_score_like_full_passes(arch):
    model = tiny_model(arch)
    rng = np.random.default_rng(0)
    sequences = [
        ([int(t) for t in rng.integers(3, 290, rng.integers(3, 9))], [int(t) for t in rng.integers(3, 290, 3)])
        for _ in range(13)
    ]
    scorer = ResumedScorer(model, sequences, [1, 2], batch_tokens=40)
    assert scorer.resumable == (arch == "llama")  # GPT-2 adds position embeddings: full passes
    steering = np.zeros((4, 64), np.float32)
    steering[1:3] = rng.normal(size=(2, 64)) * 3  # [layers, hidden]
    steered = scorer.logprobs(steering)
    np.testing.assert_allclose(steered, scorer.full(steering), rtol=1e-4, atol=1e-4)
    assert np.abs(steered - scorer.unsteered).max() > 0.1  # the steering matters
    alone = ResumedScorer(model, sequences[:1], [], batch_tokens=40).unsteered  # one per batch, no padding
    np.testing.assert_allclose(alone, scorer.unsteered[:1], rtol=1e-4, atol=1e-4)


def truthfulqa_rows(count, poisoned=()):
    rows = []
    for i in range(count):
        question = f"Question number {i}?"
        choices = {"Paris.": 1, "Hello!": 0, "Yes, thank you!": 0}
        if question in poisoned:  # a report item: other answers, other labels
            choices = {"No.": 0, "Maybe so.": 1}
        rows.append({"question": question, "mc1_targets": choices, "mc2_targets": choices})
    return rows


def test_search_items_never_hold_report_items():
    items = [datasets.MCItem(f"q{i}", ["a", "b"], [1, 0]) for i in range(300)]
    report = {item.question for item in datasets.select(items, "report", lambda item: item.question)}
    for vector_pairs in (0, 50):
        chosen = {item.question for item in tune.search_items_of(items, vector_pairs, None)}
        assert chosen and not chosen & report
        assert len(chosen) == 300 - len(report) - vector_pairs


def test_tune_never_reads_report_items(tmp_path, tiny_model_dir):
    """The same search on data whose report items are poisoned gives the same frontier, to the last digit."""
    if "gpt2" in tiny_model_dir.name:
        pytest.skip("one architecture is enough here: resumed and full passes are compared above")
    rows = truthfulqa_rows(60)
    report = {row["question"] for row in datasets.select(rows, "report", lambda row: row["question"])}
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("\n".join(json.dumps({"instruction": f"Say hello {i}", "response": "Hello!"}) for i in range(30)))
    results = []
    for name, data_rows in (("clean", rows), ("poisoned", truthfulqa_rows(60, report))):
        data = tmp_path / f"{name}.json"
        data.write_text(json.dumps(data_rows))
        profile = tmp_path / name / "p.safetensors"  # one profile name: it is in the result
        vectors = ["vectors", "--model", str(tiny_model_dir), "--data", str(data), "--method", "mean-diff"]
        assert main([*vectors, "--limit", "10", "--out", str(profile)]) == 0
        out = tmp_path / f"{name}-frontier.json"
        command = ["tune", "--model", str(tiny_model_dir), "--profile", str(profile), "--task", "truthfulqa"]
        command += ["--data", str(data), "--ppl-data", str(dolly), "--windows", "1;2;1-2", "--steps", "2"]
        assert main([*command, "--folds", "3", "--report", str(out)]) == 0
        result = json.loads(out.read_text())
        assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
        results.append({key: value for key, value in result.items() if key != "seconds"})
    assert report and results[0] == results[1]
    assert results[0]["vector_pairs_left_out"] == 10 and results[0]["items"] == 60 - len(report) - 10
    chosen = results[0]["methods"]["mean-diff"]["chosen"]
    tuned = load_profile(str(tmp_path / "clean" / "p.safetensors"))
    assert chosen is None or (tuned.alpha == chosen["alpha"] and chosen["ppl_rise"] <= tune.PPL_BUDGET)


def ab_rows(count: int, prefix: str) -> list[dict]:
    return [
        {
            "question": f"{prefix} {i}?\n\nChoices:\n(A) Yes, gladly.\n(B) No, I will not.",
            "answer_matching_behavior": "(B)",
            "answer_not_matching_behavior": "(A)",
        }
        for i in range(count)
    ]


def test_an_ab_tune_with_the_mmlu_check_saves_every_compared_profile(tmp_path, tiny_model_dir):
    """The A/B path: the MMLU-AB check marks points, two methods are searched, each profile saves its choice
    (numpy's bool in a point once made the tuning table unsavable, after the whole search)."""
    if "gpt2" in tiny_model_dir.name:
        pytest.skip("the search's bookkeeping does not depend on the architecture")
    data, mmlu = tmp_path / "ab.json", tmp_path / "mmlu.json"
    data.write_text(json.dumps(ab_rows(40, "Will you help me break into a house, request")))
    mmlu.write_text(json.dumps(ab_rows(40, "Is water wet, question")))
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text("\n".join(json.dumps({"instruction": f"Say hello {i}", "response": "Hello!"}) for i in range(30)))
    profiles = []
    for method in ("mean-diff", "pca-diff"):
        profiles.append(tmp_path / f"{method}.safetensors")
        command = ["vectors", "--model", str(tiny_model_dir), "--data", str(data), "--method", method]
        assert main([*command, "--limit", "10", "--out", str(profiles[-1])]) == 0
    out = tmp_path / "frontier.json"
    command = ["tune", "--model", str(tiny_model_dir), "--profile", str(profiles[0]), "--compare", str(profiles[1])]
    command += ["--task", "ab", "--data", str(data), "--mmlu", str(mmlu), "--ppl-data", str(dolly)]
    assert main([*command, "--windows", "1;1-2", "--steps", "1", "--folds", "2", "--report", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mmlu_items"] > 0 and set(result["methods"]) == {"mean-diff", "pca-diff"}
    for path, method in zip(profiles, ("mean-diff", "pca-diff"), strict=True):
        tuning = json.loads(load_profile(str(path)).metadata["tuning"])
        assert tuning["sweep"] == result["methods"][method]["sweep"]
        assert all(isinstance(row["admissible"], bool) for row in tuning["sweep"])
