"""`grains-edge vectors`: build a steering profile from contrastive data."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from grains_edge.errors import GrainsError
from grains_edge.options import AGGREGATES, METHODS, SCORES, TOWARD, finite_float


def register(subparsers) -> None:
    parser = subparsers.add_parser("vectors", help="build a steering profile (GRAINS or a baseline)")
    parser.add_argument("--data", required=True, help="TruthfulQA MC JSON, CAA A/B JSON, or JSONL of pairs")
    parser.add_argument("--method", default="grains", choices=METHODS)
    parser.add_argument(
        "--out", required=True, help="a profile name (saved in the profiles folder) or a .safetensors path"
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--layers", default="all", help="layers the profile steers: all | A-B | i,j,k")
    parser.add_argument(
        "--alpha", type=finite_float, default=0.02, help="default strength, in hidden-state norms (tune chooses one)"
    )
    parser.add_argument("--k", type=int, default=10, help="GRAINS: tokens masked on each side")
    parser.add_argument("--ig-steps", type=int, default=20, help="GRAINS: Integrated Gradients steps")
    parser.add_argument("--aggregate", default="pc1", choices=AGGREGATES, help="GRAINS: deltas -> v+ and v-")
    parser.add_argument(
        "--attributions",
        default=None,
        help="GRAINS: an .npz that keeps the Integrated Gradients of every pair; a rebuild with another --k or "
        "--aggregate, or after an interruption, reuses them",
    )
    parser.add_argument("--limit", type=int, default=None, help="use at most N pairs")
    parser.add_argument("--split", default="train", choices=("train", "all"), help="train: hold out validation")
    parser.add_argument("--score", default="text", choices=SCORES, help="CAA answers as text or letter")
    parser.add_argument("--toward", default="matching", choices=TOWARD, help="CAA: the answer to steer toward")
    parser.add_argument("--description", default="", help="one line shown in the chat's profile list")
    parser.set_defaults(run=run)


def output_path(out: str) -> Path:
    from grains_edge import paths
    from grains_edge.steer.profiles import SUFFIX

    given = Path(out).expanduser()
    return given if given.suffix == SUFFIX else paths.profiles_dir() / f"{out}{SUFFIX}"


def run(args: argparse.Namespace) -> int:
    import torch

    from grains_edge.evaluate import datasets
    from grains_edge.layers import parse_layers
    from grains_edge.model import sources
    from grains_edge.steer import vectors
    from grains_edge.steer.attribution import ScoreCache
    from grains_edge.steer.profiles import Profile, save_profile

    if args.k < 1 or args.ig_steps < 1:
        raise GrainsError("--k and --ig-steps must be at least 1; fix: pass positive numbers")
    datasets.check_limit(args.limit)
    pairs = datasets.load_pairs(args.data, score=args.score, toward=args.toward)
    if args.split == "train":
        pairs, _ = datasets.split(pairs, key=lambda pair: pair.prompt)
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if not pairs:
        raise GrainsError(f"no pairs to learn from in {args.data}; fix: check the file or --split all")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tokenizer = sources.load(args.model)
    layers = parse_layers(args.layers, model.config.num_hidden_layers)
    fingerprint = sources.fingerprint(model)
    cache = ScoreCache(args.attributions, fingerprint) if args.attributions and args.method == "grains" else None
    token_pairs, skipped = vectors.fitting_pairs(model, vectors.tokenize_pairs(tokenizer, pairs))
    if skipped:
        print(
            f"[grains-edge] left out {skipped} of {len(pairs)} pairs longer than the model's context "
            f"({vectors.model_context(model)} tokens)",
            file=sys.stderr,
        )
    started = time.perf_counter()
    steering = vectors.build(
        model,
        token_pairs,
        args.method,
        k=args.k,
        steps=args.ig_steps,
        progress=vectors.progress_bar(f"{args.method} vectors"),
        aggregate=args.aggregate,
        cache=cache,
    )
    seconds = time.perf_counter() - started
    name = Path(args.out).stem
    profile = Profile(
        name=name,
        vectors=steering,
        layers=layers,
        alpha=args.alpha,
        method=args.method,
        metadata={
            "source": f"{Path(args.data).name} ({args.split} split, {len(token_pairs)} pairs, {args.score} answers, "
            f"toward {args.toward})",
            "model": args.model,
            "fingerprint": fingerprint,
            "k": str(args.k),
            "ig_steps": str(args.ig_steps),
            "aggregate": args.aggregate if args.method == "grains" else "",
            "build_seconds": f"{seconds:.0f}",
            "description": args.description,
        },
    )
    path = save_profile(profile, output_path(args.out))
    print(f"wrote {path} ({args.method}, {len(token_pairs)} pairs, {seconds:.0f} s)")
    return 0
