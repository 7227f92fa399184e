"""`grains-edge tune`: choose a profile's layers and strength on its behaviour/capability frontier.

For every layer set of a family (single layers across the depth, pairs, short windows; or --windows), the
search (`evaluate/frontier.py`) finds by bisection the largest α whose Dolly response perplexity rises by at
most 3 %, scores the behaviour there and at one α below it, and chooses the layer set by k-fold
cross-validation over the scored items, ties going to the smaller perplexity cost. The items are the train
and tune splits minus the train questions the vectors were built from (`search_items`): the report split is
never read. --compare searches other profiles built from the same pairs (mean-diff, PCA-diff) on the same
items; every named profile gets its own choice. The scoring runs in PyTorch, each pass resumed at its first
steered layer (`evaluate/resumed.py`). --report writes the frontier as JSON and the plot as a PNG beside it.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from grains_edge.options import SCORES, TOWARD, finite_floats

if TYPE_CHECKING:  # numpy is imported where it runs: `--help` stays fast
    import numpy as np

PPL_BUDGET = 0.03
MMLU_BUDGET = 0.01
BRACKET = "0.01,0.32"  # the bisection's default bracket on α


def register(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="choose layers and alpha for a profile on its frontier")
    parser.add_argument("--profile", required=True, help="profile name or path (updated in place)")
    parser.add_argument("--compare", default="", help="other profiles (comma-separated) searched on the same items")
    parser.add_argument("--task", required=True, choices=("truthfulqa", "ab"))
    parser.add_argument("--data", required=True, help="the behaviour data the profile was built from")
    parser.add_argument("--ppl-data", required=True, help="Dolly JSONL for the perplexity check")
    parser.add_argument("--mmlu", default=None, help="2-choice MMLU JSON for the capability check (optional)")
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--alphas", type=finite_floats, default=BRACKET, help="the bisection's bracket: its smallest and largest"
    )
    parser.add_argument("--steps", type=int, default=3, help="bisection steps per layer set")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds over the scored items")
    parser.add_argument(
        "--windows", default="auto", help="auto (singles, pairs, short windows) or layer specs separated by ';'"
    )
    parser.add_argument(
        "--vector-pairs",
        type=int,
        default=None,
        help="the first N train items built the vectors and are not scored (default: the count in the profile)",
    )
    parser.add_argument("--score", default="text", choices=SCORES)
    parser.add_argument("--toward", default="matching", choices=TOWARD)
    parser.add_argument("--limit", type=int, default=None, help="at most N scored items")
    parser.add_argument("--ppl-limit", type=int, default=None, help="at most N Dolly responses")
    parser.add_argument("--report", default=None, help="also write the frontier as JSON here (and a PNG beside it)")
    parser.set_defaults(run=run)


def built_from(profile) -> int:
    """How many pairs the profile's vectors came from, as its `source` says ("… 120 pairs …"); 0 if unsaid."""
    found = re.search(r"(\d+) pairs", profile.metadata.get("source", ""))
    return int(found.group(1)) if found else 0


def search_items(task: str, data: str, score: str, toward: str, vector_pairs: int, limit: int | None) -> list:
    """The items of `data` the search may score (`search_items_of`). TruthfulQA: MC1 items."""
    from grains_edge.evaluate import datasets

    items = datasets.load_truthfulqa(data)[0] if task == "truthfulqa" else datasets.load_ab(data, score, toward)
    return search_items_of(items, vector_pairs, limit, data)


def search_items_of(items: list, vector_pairs: int, limit: int | None, source: str = "the data") -> list:
    """The tune split, then the train items after the first `vector_pairs` (theirs built the vectors): never
    an item of the report split."""
    from grains_edge.evaluate import datasets

    train = datasets.select(items, "train", lambda item: item.question, None, source)
    tune = datasets.select(items, "tune", lambda item: item.question, None, source)
    chosen = tune + train[vector_pairs:]
    return chosen[:limit] if limit is not None else chosen


def layer_sets_of(windows: str, num_layers: int) -> list[str]:
    """The layer sets --windows names: the frontier's own family for "auto", else the specs between ';'."""
    from grains_edge.evaluate import frontier

    return frontier.layer_sets(num_layers) if windows == "auto" else windows.split(";")


def sequences_of(task: str, item) -> list[tuple[str, str]]:
    """The (prompt, answer) sequences scored for one item: every MC1 choice, or the two A/B answers."""
    if task == "truthfulqa":
        return [(item.question, choice) for choice in item.choices]
    return [(item.question, item.matching), (item.question, item.other)]


def per_item(task: str, items: list, logprobs: np.ndarray) -> np.ndarray:
    """Per item 1.0 when the behaviour holds: MC1's top choice is true, or the matching answer wins."""
    import numpy as np

    result, start = [], 0
    for item in items:
        count = len(item.choices) if task == "truthfulqa" else 2
        scores = logprobs[start : start + count]
        result.append(
            float(item.labels[int(np.argmax(scores))]) if task == "truthfulqa" else float(scores[0] > scores[1])
        )
        start += count
    return np.asarray(result)  # [items]


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from grains_edge.errors import GrainsError
    from grains_edge.evaluate import datasets, frontier, frontier_plot
    from grains_edge.evaluate.resumed import ResumedScorer
    from grains_edge.evaluate.scoring import finite_json
    from grains_edge.layers import parse_layers
    from grains_edge.model import sources
    from grains_edge.steer import profiles
    from grains_edge.steer.vectors import chat_prompt, model_context

    datasets.check_limit(args.limit)
    datasets.check_limit(args.ppl_limit, "--ppl-limit")
    if args.steps < 1 or args.folds < 2:
        raise GrainsError("--steps must be at least 1 and --folds at least 2; fix: pass e.g. --steps 3 --folds 5")
    named = [args.profile, *[name for name in args.compare.split(",") if name.strip()]]
    loaded = [profiles.load_profile(name) for name in named]
    vector_pairs = built_from(loaded[0]) if args.vector_pairs is None else args.vector_pairs
    items = search_items(args.task, args.data, args.score, args.toward, vector_pairs, args.limit)
    prompts, responses = datasets.load_dolly(args.ppl_data)
    dolly = datasets.select(
        list(zip(prompts, responses, strict=True)), "train+tune", lambda item: item[0], args.ppl_limit, args.ppl_data
    )
    mmlu = (
        datasets.select(datasets.load_ab(args.mmlu), "tune", lambda i: i.question, None, args.mmlu) if args.mmlu else []
    )

    model, tokenizer = sources.load(args.model)
    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    for profile in loaded:
        profiles.check_fits(profile, num_layers, hidden, sources.fingerprint(model))
    sets = layer_sets_of(args.windows, num_layers)
    starts = [parse_layers(layers, num_layers)[0] for layers in sets]
    prompt_ids = {}

    def tokenized(pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        for prompt, _ in pairs:
            prompt_ids.setdefault(prompt, chat_prompt(tokenizer, prompt))
        return [(prompt_ids[p], tokenizer.encode(a, add_special_tokens=False)) for p, a in pairs]

    def fitting(rows: list, sequences) -> list:
        kept = [row for row in rows if max(sum(map(len, s)) for s in tokenized(sequences(row))) <= model_context(model)]
        if len(kept) < len(rows):
            print(
                f"[grains-edge] left out {len(rows) - len(kept)} items longer than the model's context", file=sys.stderr
            )
        return kept

    items = fitting(items, lambda item: sequences_of(args.task, item))
    dolly = fitting(dolly, lambda item: [item])
    mmlu = fitting(mmlu, lambda item: sequences_of("ab", item))
    if not items:
        raise GrainsError("no train or tune items left to score; fix: lower --vector-pairs or add items")
    pad = tokenizer.pad_token_id or 0
    started = time.perf_counter()
    behaviour_scorer = ResumedScorer(
        model, tokenized([s for item in items for s in sequences_of(args.task, item)]), starts, pad_id=pad
    )
    ppl_scorer = ResumedScorer(model, tokenized(dolly), starts, pad_id=pad)
    mmlu_scorer = ResumedScorer(model, tokenized([s for i in mmlu for s in sequences_of("ab", i)]), starts, pad_id=pad)
    answer_tokens = sum(len(a) for _, a in tokenized(dolly))
    unsteered_behaviour = per_item(args.task, items, behaviour_scorer.unsteered)
    unsteered_mmlu = per_item("ab", mmlu, mmlu_scorer.unsteered).mean() if mmlu else None
    report = {
        "task": args.task,
        "items": len(items),
        "vector_pairs_left_out": vector_pairs,
        "ppl_items": len(dolly),
        "mmlu_items": len(mmlu),
        "folds": args.folds,
        "bracket": [min(args.alphas), max(args.alphas)],
        "steps": args.steps,
        "layer_sets": sets,
        "resumed_passes": behaviour_scorer.resumable,
        "unsteered": {
            "behaviour": float(unsteered_behaviour.mean()),
            "ppl": float(np.exp(-ppl_scorer.unsteered.sum() / answer_tokens)),
        },
        "methods": {},
    }
    print(f"unsteered: {report['unsteered']}", flush=True)
    for profile in loaded:

        def steering(layers: str, alpha: float, profile=profile) -> np.ndarray:
            windowed = profiles.Profile(
                profile.name, profile.vectors, parse_layers(layers, num_layers), alpha, profile.method
            )
            return profiles.steering_tensor(windowed, alpha)

        def ppl_rise(layers: str, alpha: float) -> float:
            logprobs = ppl_scorer.logprobs(steering(layers, alpha))
            rise = float(np.exp((ppl_scorer.unsteered.sum() - logprobs.sum()) / answer_tokens) - 1)
            return rise if np.isfinite(rise) else float("inf")  # too strong to score: past any budget

        def behaviour(layers: str, alpha: float) -> np.ndarray:
            logprobs = behaviour_scorer.logprobs(steering(layers, alpha))
            if not np.isfinite(logprobs).all():
                return np.full(len(items), -1.0)  # never chosen: its perplexity is infinite as well
            return per_item(args.task, items, logprobs) - unsteered_behaviour

        points, probes = frontier.explore(
            sets,
            ppl_rise,
            behaviour,
            PPL_BUDGET,
            (min(args.alphas), max(args.alphas)),
            args.steps,
            lambda line, name=profile.name: print(f"[{time.perf_counter() - started:.0f} s] {name} {line}", flush=True),
        )
        for point in points if mmlu else []:
            rate = per_item("ab", mmlu, mmlu_scorer.logprobs(steering(point.layers, point.alpha))).mean()
            point.admissible = point.admissible and bool(rate >= unsteered_mmlu - MMLU_BUDGET)  # not numpy's bool
        chosen, scores = frontier.choose(points, args.folds)
        rows = [
            {
                "layers": p.layers,
                "alpha": p.alpha,
                "behaviour": p.behaviour,
                "ppl_rise": p.ppl_rise,
                "admissible": p.admissible,
            }
            for p in points
        ]
        best = next((row for row, p in zip(rows, points, strict=True) if p is chosen), None)
        if best is not None:
            best = {**best, "cv_behaviour": scores[chosen.layers]}
        report["methods"][profile.method if profile.method not in report["methods"] else profile.name] = {
            "profile": profile.name,
            "chosen": best,
            "cv_by_layer_set": scores,
            "sweep": rows,
            "probes": probes,
        }
        if best is None:
            print(
                f"[grains-edge] {profile.name}: no setting passed the capability check (perplexity +3 %, MMLU-AB "
                f"-1 point); it keeps α {profile.alpha:g}; fix: try a lower --alphas bracket or other --windows",
                file=sys.stderr,
            )
        else:
            profile.layers, profile.alpha = parse_layers(best["layers"], num_layers), best["alpha"]
        profile.metadata["tuning"] = finite_json(
            {
                "chosen": best,
                "unsteered": report["unsteered"],
                "items": len(items),
                "ppl_items": len(dolly),
                "sweep": rows,
                "cv_by_layer_set": scores,
            }
        )
        profiles.save_profile(profile, profile.path)
    report["seconds"] = round(time.perf_counter() - started)
    if args.report:
        Path(args.report).write_text(finite_json(report, indent=2))
        frontier_plot.plot(
            {method: entry["sweep"] for method, entry in report["methods"].items()},
            {method: entry["chosen"] for method, entry in report["methods"].items()},
            Path(args.report).with_suffix(".png"),
            f"{Path(args.data).name}: {len(items)} train+tune items, {len(dolly)} Dolly responses",
            "MC1" if args.task == "truthfulqa" else "behaviour rate",
            PPL_BUDGET,
        )
    summary = {method: entry["chosen"] for method, entry in report["methods"].items()}
    print(finite_json({"chosen": summary, "unsteered": report["unsteered"]}, indent=2))
    return 0
