"""The behaviour/capability frontier of a steering profile: which layers, and how strong.

For every layer set of a family (single layers across the depth, pairs, short windows), bisection on log α
finds the largest strength whose perplexity rise stays within the budget; the behaviour is scored there and
at the next strength below it that the bisection found admissible (or at 0.6 of it). Every scored point keeps
its per-item behaviour change against the unsteered model, so the choice is arithmetic on those arrays:

  * a layer set's cross-validated score: for each of k folds of the items, α is chosen on the other folds
    and its behaviour change counted on the held-out fold; the mean over all held-out items is the score;
  * the chosen set is the one with the best score, ties going to the smaller perplexity cost, and its α is
    then chosen on all items by the same rule.

This module sees only callables that measure a (layers, α) setting: it never reads data, so which items
exist (train + tune, never report) is decided by its caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

PPL_BUDGET = 0.03  # the capability check: response perplexity may rise by at most 3 %
LOWER_FRACTION = 0.6  # the second scored strength, when the bisection admitted none below the largest


@dataclass
class Point:
    """One scored setting: behaviour change per item [items] and the perplexity rise (steered / unsteered - 1)."""

    layers: str
    alpha: float
    ppl_rise: float
    changes: np.ndarray = field(repr=False)
    admissible: bool = True

    @property
    def behaviour(self) -> float:
        return float(self.changes.mean())


def layer_sets(num_layers: int, singles: int = 5) -> list[str]:
    """The default family: `singles` single layers spread over the middle 80 % of the depth, a pair at 45 % and
    at 55 % of the depth, and windows of 3 and 5 layers centred at half the depth."""
    middle = num_layers // 2
    spread = [round(num_layers * (0.1 + 0.8 * (i + 0.5) / singles)) for i in range(singles)]
    pairs = [round(num_layers * depth) for depth in (0.45, 0.55)]
    sets = [str(layer) for layer in spread]
    sets += [f"{first},{first + 1}" for first in pairs if first + 1 < num_layers]
    sets += [f"{max(0, middle - half)}-{min(num_layers - 1, middle + half)}" for half in (1, 2)]
    return list(dict.fromkeys(sets))


def within_budget(rise: float, budget: float) -> bool:
    """A finite rise at most the budget (a setting too strong to score has an infinite one)."""
    return math.isfinite(rise) and rise <= budget


def largest_alpha(
    rise: Callable[[float], float], budget: float, low: float, high: float, steps: int
) -> tuple[float | None, dict[float, float]]:
    """(the largest α in [low, high] whose rise stays within budget, to a factor (high/low)^(2^-steps); every
    probe's rise), by bisection on log α, assuming the rise grows with α. None when even `low` is over budget;
    `high` is returned (and probed) only when every probe below it passed."""
    probes: dict[float, float] = {}

    def within(alpha: float) -> bool:
        probes[alpha] = rise(alpha)
        return within_budget(probes[alpha], budget)

    passing, failing = low, high
    for _ in range(steps):
        middle = math.sqrt(passing * failing)
        if within(middle):
            passing = middle
        else:
            failing = middle
    if passing == low and not within(low):
        return None, probes
    if failing == high and within(high):
        return high, probes
    return passing, probes


def scored_alphas(best: float, probes: dict[float, float], budget: float) -> list[float]:
    """The largest admissible α and the next admissible probe below it (or LOWER_FRACTION of it)."""
    below = [alpha for alpha, rise in probes.items() if alpha < best and within_budget(rise, budget)]
    return [best, max(below) if below else best * LOWER_FRACTION]


def explore(
    sets: Sequence[str],
    ppl_rise: Callable[[str, float], float],
    behaviour: Callable[[str, float], np.ndarray],
    budget: float = PPL_BUDGET,
    bracket: tuple[float, float] = (0.01, 0.32),
    steps: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[Point], list[dict]]:
    """(the scored points of every layer set, every perplexity probe): ppl_rise(layers, α) and
    behaviour(layers, α) -> per-item change [items] measure one setting."""
    points, probes_table = [], []
    for layers in sets:
        rises: dict[float, float] = {}

        def rise(alpha: float, layers: str = layers, rises: dict = rises) -> float:
            if alpha not in rises:
                rises[alpha] = ppl_rise(layers, alpha)
            return rises[alpha]

        best, probes = largest_alpha(rise, budget, *bracket, steps)
        probes_table += [  # a rise too large to score is None: JSON has no infinity
            {"layers": layers, "alpha": a, "ppl_rise": r if math.isfinite(r) else None}
            for a, r in sorted(probes.items())
        ]
        if best is None:
            log(f"{layers}: even α {bracket[0]:g} raises perplexity past the budget")
            continue
        for alpha in scored_alphas(best, probes, budget):
            point = Point(layers, alpha, rise(alpha), np.asarray(behaviour(layers, alpha), float))
            point.admissible = within_budget(point.ppl_rise, budget)
            points.append(point)
            log(f"{layers} α {alpha:.4g}: behaviour {point.behaviour:+.4f}, perplexity {100 * point.ppl_rise:+.2f} %")
    return points, probes_table


def best_point(points: Sequence[Point], items: np.ndarray) -> Point:
    """The admissible point with the largest mean change over `items` (indices); ties go to the smaller cost."""
    return max(points, key=lambda p: (round(float(p.changes[items].mean()), 9), -p.ppl_rise))


def folds_of(count: int, k: int) -> list[np.ndarray]:
    """k folds of item indices, item i in fold i mod k (at most one fold per item)."""
    return [np.arange(fold, count, k) for fold in range(min(k, count))]


def cross_validated(points: Sequence[Point], k: int) -> float:
    """Mean held-out change when α is chosen on the other folds: the estimate of a set's gain on new items."""
    count = len(points[0].changes)
    held_out = 0.0
    for fold in folds_of(count, k):
        others = np.setdiff1d(np.arange(count), fold)
        held_out += float(best_point(points, others if len(others) else fold).changes[fold].sum())
    return held_out / count


def choose(points: Sequence[Point], k: int) -> tuple[Point | None, dict[str, float]]:
    """(the chosen point, each layer set's cross-validated score): the set with the best score, ties to the
    smaller perplexity cost of its own choice, and within it α chosen on all items."""
    admissible = [point for point in points if point.admissible]
    by_set: dict[str, list[Point]] = {}
    for point in admissible:
        by_set.setdefault(point.layers, []).append(point)
    scores = {layers: cross_validated(group, k) for layers, group in by_set.items()}
    if not scores:
        return None, scores
    everything = np.arange(len(admissible[0].changes))
    own = {layers: best_point(group, everything) for layers, group in by_set.items()}
    chosen = max(by_set, key=lambda layers: (round(scores[layers], 9), -own[layers].ppl_rise))
    return own[chosen], scores
