"""`grains-edge eval`: behaviour and capability through the ONNX engine, as JSON."""

from __future__ import annotations

import argparse
import json

SPLITS = ("report", "tune", "validation", "train", "train+tune", "all")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="measure a profile through the ONNX engine (JSON)")
    parser.add_argument("task", choices=("truthfulqa", "ab", "ppl"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="default", help="model spec or export folder")
    parser.add_argument("--profile", default="none", help="NAME, PATH or none")
    parser.add_argument("--alpha", type=float, default=None, help="strength (default: the profile's)")
    parser.add_argument("--layers", default=None, help="override the profile's layers: A-B | i,j,k | all")
    parser.add_argument(
        "--split",
        default="report",
        choices=SPLITS,
        help="train: vectors; tune: layer/alpha choice; report: held out from both; validation = tune + report; "
        "train+tune = all but report",
    )
    parser.add_argument("--score", default="text", choices=("text", "letter"), help="ab: score the letter or the text")
    parser.add_argument("--toward", default="matching", choices=("matching", "not-matching"), help="ab: preferred side")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.set_defaults(run=run)


def steering_for(engine, profile_name: str, alpha, layers_spec):
    from grains_edge.layers import parse_layers
    from grains_edge.profiles import load_profile, steering_tensor

    if profile_name == "none":
        return None, {"profile": "none"}
    profile = load_profile(profile_name)
    if layers_spec:
        profile.layers = parse_layers(layers_spec, engine.num_layers)
    strength = profile.alpha if alpha is None else alpha
    info = {"profile": profile.name, "method": profile.method, "alpha": strength, "layers": profile.layers}
    return steering_tensor(profile, strength), info


def select(items, split: str, key, limit=None):
    """The items of one split: 70 % train, 30 % validation, the validation halved into tune and report."""
    from grains_edge import datasets

    if split != "all":
        train, validation = datasets.split(items, key)
        report, tune = datasets.split(validation, lambda item: "tune/" + key(item), validation_fraction=0.5)
        chosen = {"train": train, "validation": validation, "tune": tune, "report": report, "train+tune": train + tune}
        items = chosen[split]
    return items[:limit] if limit else items


def evaluate(engine, task: str, data: str, steering, split: str, score: str, limit, toward: str = "matching") -> dict:
    from grains_edge import datasets, evaluation

    if task == "truthfulqa":
        mc1, mc2 = datasets.load_truthfulqa(data)
        return evaluation.truthfulqa(
            engine,
            select(mc1, split, lambda i: i.question, limit),
            select(mc2, split, lambda i: i.question, limit),
            steering,
            against_unsteered=True,
        )
    if task == "ab":
        items = select(datasets.load_ab(data, score, toward), split, lambda i: i.question, limit)
        return evaluation.ab_preference(engine, items, steering, against_unsteered=True)
    prompts, responses = datasets.load_dolly(data)
    chosen = select(list(zip(prompts, responses, strict=True)), split, lambda item: item[0], limit)
    return evaluation.perplexity(
        engine, [p for p, _ in chosen], [r for _, r in chosen], steering, against_unsteered=True
    )


def run(args: argparse.Namespace) -> int:
    from grains_edge.bootstrap import ensure_export
    from grains_edge.engine import Engine

    engine = Engine(ensure_export(args.model), device=args.device)
    steering, info = steering_for(engine, args.profile, args.alpha, args.layers)
    result = evaluate(engine, args.task, args.data, steering, args.split, args.score, args.limit, args.toward)
    print(json.dumps({"task": args.task, "data": args.data, "split": args.split, **info, **result}, indent=2))
    return 0
