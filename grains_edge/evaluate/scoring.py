"""Behaviour and capability measured through the ONNX engine, with the steering applied while scoring.

Every score is a summed answer log-probability under the chat template (a model without one gets the
runtime's plain prompt, `grains_edge.prompts.plain_prompt`): the prompt is the user turn, the answer is the
assistant turn. Sequences are scored in right-padded batches sorted by length.

  * TruthfulQA MC1: the top-scoring choice is the true one; MC2: probability mass on the true choices
    (Lin, Hilton & Evans 2021, `mc_task.json` metrics).
  * A/B behaviour (CAA format, Rimsky et al. 2023): how often the behaviour-matching answer outscores
    the other, scored on the letter "(A)" or on the option's full text.
  * Perplexity: mean per-token negative log-likelihood of reference responses (Dolly); a profile's
    change of it is measured against the unsteered model on the same items (paired).
Intervals are 95 % bootstrap intervals over items (1,000 resamples, fixed seed).

No number is reported unless it is finite: an item longer than the model's context is refused before any
array is allocated (`fitting` drops them beforehand, with a count), log-probabilities that come out NaN or
infinite raise NonFiniteScores naming the likely cause, and every result is checked before it is returned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from grains_edge.errors import GrainsError
from grains_edge.evaluate.datasets import ABItem, MCItem
from grains_edge.runtime.engine import Engine

T = TypeVar("T")

# logits per forward pass: 2048 padded tokens of a 49,152-token vocabulary (the default model), 400 MB in float32;
# a larger vocabulary gets fewer tokens per pass (Gemma-3's 262,144: 384), so memory stays bounded
BATCH_LOGITS = 2048 * 49_152


class NonFiniteScores(GrainsError):
    """Log-probabilities or a score came out NaN or infinite: no result can be reported."""


def steering_blame(steering: np.ndarray | None) -> str:
    """The likely cause of non-finite scores, with its fix."""
    if steering is None:
        return "the unsteered model's scores are not finite: the export is damaged; fix: export the model again"
    return (
        "the steered model's scores are not finite: the profile or its α is too strong, or the profile is damaged; "
        "fix: lower --alpha or rebuild the profile"
    )


def token_pairs(engine: Engine, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(chat-template prompt ids, answer ids) of each prompt/answer pair."""
    prompt_ids = {p: engine.chat_ids([{"role": "user", "content": p}]) for p in set(prompts)}
    encode = engine.tokenizer.encode
    return [(prompt_ids[p], encode(a, add_special_tokens=False)) for p, a in zip(prompts, answers, strict=True)]


def fitting(
    engine: Engine, items: Sequence[T], sequences: Callable[[T], Iterable[tuple[str, str]]]
) -> tuple[list[T], int]:
    """(the items whose every (prompt, answer) sequence fits the model's context, how many did not); none
    fitting is a GrainsError."""
    kept = []
    for item in items:
        pairs = list(sequences(item))
        lengths = [len(p) + len(a) for p, a in token_pairs(engine, [p for p, _ in pairs], [a for _, a in pairs])]
        if max(lengths) <= engine.max_context:
            kept.append(item)
    if items and not kept:
        raise GrainsError(
            f"all {len(items)} items are longer than the model's context ({engine.max_context} tokens); "
            "fix: use shorter items or a model with a longer context"
        )
    return kept, len(items) - len(kept)


def mc_sequences(items: Sequence[MCItem]) -> list[tuple[str, str]]:
    """The (question, choice) sequences scored for one question's MC items (its MC1 and MC2 items): `fitting`
    passes each question as one tuple."""
    return [(item.question, choice) for item in items for choice in item.choices]


def ab_sequences(item: ABItem) -> list[tuple[str, str]]:
    return [(item.question, item.matching), (item.question, item.other)]


def check_finite(result: dict, steering: np.ndarray | None) -> dict:
    """`result` when every number in it is finite; a NonFiniteScores naming the first one that is not."""
    for name, value in result.items():
        if not np.isfinite(np.asarray(value, float)).all():
            raise NonFiniteScores(f"'{name}' came out {value}: {steering_blame(steering)}")
    return result


def finite_json(value, **options) -> str:
    """json.dumps refusing NaN and infinity: the last guard at the output, after the checks where scores are made."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:
        raise GrainsError("a result is not a finite number; fix: report this as a bug, with the command") from None


def require_items(items: Sequence, what: str) -> None:
    if not len(items):
        raise GrainsError(f"no {what} to score; fix: pass a data file (and split) that has some")


def answer_logprobs(
    engine: Engine, prompts: Sequence[str], answers: Sequence[str], steering: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(summed log p(answer | prompt), answer token counts) for each prompt/answer pair. A pair longer than the
    context is a GrainsError before anything is allocated; non-finite log-probabilities are NonFiniteScores."""
    if steering is not None and not np.isfinite(steering).all():
        raise NonFiniteScores("the steering is not finite: the profile or its α is damaged; fix: rebuild the profile")
    pairs = token_pairs(engine, prompts, answers)
    longest = max((len(p) + len(a) for p, a in pairs), default=0)
    if longest > engine.max_context:
        too_long = sum(len(p) + len(a) > engine.max_context for p, a in pairs)
        raise GrainsError(
            f"{too_long} prompt+answer sequences are longer than the model's context ({longest} > "
            f"{engine.max_context} tokens); fix: leave out the items longer than the context"
        )
    totals = np.zeros(len(pairs))
    counts = np.array([len(a) for _, a in pairs])
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    batch_tokens = max(1, BATCH_LOGITS // engine.manifest.vocab_size)  # padded tokens per forward pass
    start = 0
    while start < len(order):
        width = len(pairs[order[start]][0]) + len(pairs[order[start]][1])
        end = start + 1
        while end < len(order):
            longest = len(pairs[order[end]][0]) + len(pairs[order[end]][1])
            if longest * (end - start + 1) > batch_tokens:
                break
            width, end = longest, end + 1
        batch = order[start:end]
        ids = np.full((len(batch), width), engine.pad_id, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, index in enumerate(batch):
            sequence = pairs[index][0] + pairs[index][1]
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1
        logits = engine.forward(ids, mask, steering)  # [batch, width, vocab]
        for row, index in enumerate(batch):
            prompt, answer = pairs[index]
            rows = logits[row, len(prompt) - 1 : len(prompt) + len(answer) - 1]  # predict each answer token
            if not np.isfinite(rows).all():  # finite logits give finite log-probabilities below
                raise NonFiniteScores(steering_blame(steering))
            rows = rows - rows.max(-1, keepdims=True)
            log_probs = rows - np.log(np.exp(rows).sum(-1, keepdims=True))
            totals[index] = log_probs[np.arange(len(answer)), answer].sum()
        start = end
    return totals, counts


def bootstrap_interval(
    values: np.ndarray, resamples: int = 1000, seed: int = 0, weights: np.ndarray | None = None
) -> list[float]:
    """95 % percentile interval of the mean (weighted by `weights` when given: e.g. per-item rates
    weighted by token counts give a ratio of sums)."""
    values = np.asarray(values, float)
    if len(values) == 0:
        raise ValueError("no values to resample")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), (resamples, len(values)))  # [resamples, items]
    if weights is None:
        means = values[picks].mean(axis=1)
    else:
        weights = np.asarray(weights, float)
        means = (values * weights)[picks].sum(axis=1) / np.maximum(weights[picks].sum(axis=1), 1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_change(steered: np.ndarray, unsteered: np.ndarray) -> tuple[float, list[float]]:
    """Mean per-item change steered - unsteered and its 95 % bootstrap interval: the per-item differences
    are resampled, so item difficulty cancels out."""
    difference = np.asarray(steered, float) - np.asarray(unsteered, float)  # [items]
    return float(difference.mean()), bootstrap_interval(difference)


def truthfulqa(
    engine: Engine, mc1: Sequence[MCItem], mc2: Sequence[MCItem] = (), steering=None, against_unsteered: bool = False
) -> dict:
    """MC1 accuracy and (when mc2 items are given) MC2 true-probability mass, with bootstrap intervals.
    Each distinct question/answer pair is scored once, however many of the two tasks use it. With
    `against_unsteered` (and a steering), also each score's change against the unsteered model on the same
    questions, with a paired 95 % bootstrap interval."""
    require_items(mc1, "TruthfulQA questions")
    pairs = sorted({(item.question, choice) for items in (mc1, mc2) for item in items for choice in item.choices})
    runs = [steering] + ([None] if against_unsteered and steering is not None else [])
    per_run = []  # one {task: [per-question score]} per run: steered first
    for run_steering in runs:
        scores, _ = answer_logprobs(engine, [q for q, _ in pairs], [a for _, a in pairs], run_steering)
        per_run.append(question_scores(dict(zip(pairs, scores, strict=True)), mc1, mc2))
    results = {}
    for name, per_item in per_run[0].items():
        results[name] = float(np.mean(per_item))
        results[f"{name}_ci95"] = bootstrap_interval(per_item)
        if len(per_run) == 2:
            unsteered = per_run[1][name]
            results[f"unsteered_{name}"] = float(np.mean(unsteered))
            results[f"{name}_change"], results[f"{name}_change_ci95"] = paired_change(per_item, unsteered)
    results["questions"] = len(mc1)
    return check_finite(results, steering)


def question_scores(score_of: dict, mc1: Sequence[MCItem], mc2: Sequence[MCItem]) -> dict[str, np.ndarray]:
    """Per question: MC1 = 1 if the top-scored choice is true; MC2 = the normalized probability on true ones."""
    results = {}
    for name, items in (("mc1", mc1), ("mc2", mc2)):
        if not items:
            continue
        per_item = []
        for item in items:
            s = np.array([score_of[(item.question, choice)] for choice in item.choices])
            labels = np.asarray(item.labels, bool)
            if name == "mc1":
                per_item.append(float(labels[int(s.argmax())]))
            else:
                p = np.exp(s - s.max())
                per_item.append(float(p[labels].sum() / p.sum()))
        results[name] = np.asarray(per_item)  # [questions]
    return results


def ab_preference(engine: Engine, items: Sequence[ABItem], steering=None, against_unsteered: bool = False) -> dict:
    """Rate at which the behaviour-matching answer outscores the other, and the mean log-prob margin. With
    `against_unsteered` (and a steering), also how far the steering moves both: steered - unsteered, with
    paired 95 % bootstrap intervals (`paired_change`), and how many items flip each way."""
    require_items(items, "A/B items")
    prompts = [item.question for item in items for _ in range(2)]
    answers = [answer for item in items for answer in (item.matching, item.other)]
    scores, _ = answer_logprobs(engine, prompts, answers, steering)
    margin = scores[0::2] - scores[1::2]  # [items]
    wins = (margin > 0).astype(float)
    result = {
        "matching_rate": float(wins.mean()),
        "matching_rate_ci95": bootstrap_interval(wins),
        "mean_logprob_margin": float(margin.mean()),
        "mean_logprob_margin_ci95": bootstrap_interval(margin),
        "items": len(items),
    }
    if against_unsteered and steering is not None:
        unsteered, _ = answer_logprobs(engine, prompts, answers, None)
        unsteered_margin = unsteered[0::2] - unsteered[1::2]  # [items]
        unsteered_wins = (unsteered_margin > 0).astype(float)
        result["unsteered_matching_rate"] = float(unsteered_wins.mean())
        result["matching_rate_change"], result["matching_rate_change_ci95"] = paired_change(wins, unsteered_wins)
        result["flipped_to_matching"] = int(((wins == 1) & (unsteered_wins == 0)).sum())
        result["flipped_away"] = int(((wins == 0) & (unsteered_wins == 1)).sum())
        result["unsteered_mean_logprob_margin"] = float(unsteered_margin.mean())
        result["margin_change"], result["margin_change_ci95"] = paired_change(margin, unsteered_margin)
    return check_finite(result, steering)


def perplexity(
    engine: Engine, prompts: Sequence[str], responses: Sequence[str], steering=None, against_unsteered: bool = False
) -> dict:
    """Mean per-token negative log-likelihood of `responses` and its exp. With `against_unsteered` (and a
    steering), also how much the steering raises it: steered / unsteered - 1, with a paired 95 % bootstrap
    interval (both runs resampled on the same items, so item difficulty cancels out)."""
    require_items(prompts, "responses")
    scores, counts = answer_logprobs(engine, prompts, responses, steering)
    nll = float(-scores.sum() / max(1, counts.sum()))
    per_item = -scores / np.maximum(counts, 1)
    with np.errstate(over="ignore"):  # exp overflowing to inf is reported by check_finite, not as a warning
        result = {
            "nll_per_token": nll,
            "perplexity": float(np.exp(nll)),
            "nll_ci95": bootstrap_interval(per_item),
            "items": len(prompts),
        }
        if against_unsteered and steering is not None:
            unsteered, _ = answer_logprobs(engine, prompts, responses, None)
            raised = (unsteered - scores) / np.maximum(counts, 1)  # per item: NLL per token, steered - unsteered
            result["unsteered_perplexity"] = float(np.exp(-unsteered.sum() / max(1, counts.sum())))
            result["perplexity_change"] = float(np.exp((unsteered - scores).sum() / max(1, counts.sum())) - 1)
            low, high = bootstrap_interval(raised, weights=counts)  # of the NLL rise; exp - 1 is monotonic
            result["perplexity_change_ci95"] = [float(np.expm1(low)), float(np.expm1(high))]
    return check_finite(result, steering)
