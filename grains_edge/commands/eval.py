"""`grains-edge eval`: behaviour and capability through the ONNX engine, as JSON."""

from __future__ import annotations

import argparse
import sys

from grains_edge.options import DEVICES, SCORES, SPLITS, TOWARD, finite_float


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="measure a profile through the ONNX engine (JSON)")
    parser.add_argument("task", choices=("truthfulqa", "ab", "ppl"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="default", help="model spec or export folder")
    parser.add_argument("--profile", default="none", help="NAME, PATH or none")
    parser.add_argument("--alpha", type=finite_float, default=None, help="strength (default: the profile's)")
    parser.add_argument("--layers", default=None, help="override the profile's layers: A-B | i,j,k | all")
    parser.add_argument(
        "--split",
        default="report",
        choices=SPLITS,
        help="train: vectors; tune: layer/alpha choice; report: held out from both; validation = tune + report; "
        "train+tune = all but report",
    )
    parser.add_argument("--score", default="text", choices=SCORES, help="ab: score the letter or the text")
    parser.add_argument("--toward", default="matching", choices=TOWARD, help="ab: preferred side")
    parser.add_argument("--limit", type=int, default=None, help="at most N items of the split (N ≥ 1)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.set_defaults(run=run)


def load_items(task: str, data: str, split: str, score: str, limit, toward: str = "matching"):
    """The task's items in one split: (MC1, MC2) question lists, A/B items, or (prompt, response) pairs."""
    from grains_edge.evaluate import datasets

    datasets.check_limit(limit)
    if task == "truthfulqa":
        mc1, mc2 = datasets.load_truthfulqa(data)
        return datasets.select(mc1, split, lambda i: i.question, limit, data), datasets.select(
            mc2, split, lambda i: i.question, limit
        )
    if task == "ab":
        return datasets.select(datasets.load_ab(data, score, toward), split, lambda i: i.question, limit, data)
    prompts, responses = datasets.load_dolly(data)
    return datasets.select(list(zip(prompts, responses, strict=True)), split, lambda item: item[0], limit, data)


def evaluate(engine, task: str, items, steering) -> dict:
    """The task's scores on the items that fit the model's context, steered and against the unsteered model;
    `skipped_too_long` counts the items left out (said on stderr as well)."""
    from grains_edge.evaluate import scoring

    if task == "truthfulqa":  # a question is left out of both tasks when any MC1 or MC2 choice is too long
        questions, skipped = scoring.fitting(engine, list(zip(*items, strict=True)), scoring.mc_sequences)
        mc1, mc2 = [q for q, _ in questions], [q for _, q in questions]
        result = scoring.truthfulqa(engine, mc1, mc2, steering, against_unsteered=True)
    elif task == "ab":
        kept, skipped = scoring.fitting(engine, items, scoring.ab_sequences)
        result = scoring.ab_preference(engine, kept, steering, against_unsteered=True)
    else:
        kept, skipped = scoring.fitting(engine, items, lambda item: [item])
        result = scoring.perplexity(
            engine, [p for p, _ in kept], [r for _, r in kept], steering, against_unsteered=True
        )
    if skipped:
        print(
            f"[grains-edge] left out {skipped} items longer than the model's context ({engine.max_context} tokens)",
            file=sys.stderr,
        )
    return {**result, "skipped_too_long": skipped}


def run(args: argparse.Namespace) -> int:
    from grains_edge.evaluate.scoring import finite_json
    from grains_edge.runtime.bootstrap import ensure_export
    from grains_edge.runtime.engine import Engine
    from grains_edge.steer.profiles import steering_for

    items = load_items(args.task, args.data, args.split, args.score, args.limit, args.toward)  # before the model
    engine = Engine(ensure_export(args.model), device=args.device)
    steering, info = steering_for(engine, args.profile, args.alpha, args.layers)
    result = evaluate(engine, args.task, items, steering)
    report = {"task": args.task, "data": args.data, "split": args.split, **info, **result}
    print(finite_json(report, indent=2))
    return 0
