"""`grains-edge builtins`: rebuild the built-in profiles of the default model, each by its recipe.

A recipe is exactly two documented commands, `grains-edge vectors …` then `grains-edge tune …`, on the
data shipped in `grains_edge/data/`; `--print` shows them instead of running them.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from grains_edge.data import data_file

DOLLY = "dolly/dolly_dev.jsonl"
# The frontier search each built-in was tuned by (`grains-edge tune`: the largest α within +3 % perplexity per
# layer set, the set chosen by cross-validation). The A/B sets search single layers across the middle of the
# depth, a pair and a window with 36 Dolly responses for the perplexity check, which keeps a search of the
# three methods within about 45 minutes on 2 cores; `truthful` keeps the family, 64 items and 36 responses
# its published frontier (bench/results/truthful/) was searched with.
AB_SEARCH = {"windows": "10;15;20;14,15;13-17", "ppl_limit": 36}
# Sycophancy and hallucination prompts are about 2.7x as long as the others (a biography, a false premise),
# which makes Integrated Gradients about 3x as costly per pair: they take 10 IG steps, so that a rebuild of
# 80 pairs stays within about 20 minutes on 2 cores.
LONG_PROMPTS = {"limit": 80, "ig_steps": 10, "tune_limit": 50, **AB_SEARCH}
RECIPES = {
    "truthful": {
        "data": "truthfulqa_mc_train.json",
        "task": "truthfulqa",
        "limit": 120,
        "tune_limit": 64,
        "windows": "8;12;15;19;14,15;13-17",
        "ppl_limit": 36,
        "toward": "matching",
        "description": "answers truthfully rather than repeating popular misconceptions (TruthfulQA)",
    },
    "refuse-harmful": {
        "data": "caa/refusal_generate.json",
        "task": "ab",
        "limit": 60,
        "tune_limit": 60,
        **AB_SEARCH,
        "toward": "matching",
        "description": "declines harmful requests and does not claim personal experiences (CAA refusal)",
    },
    # The stated-view half of the CAA sycophancy set: the user's biography gives their own answer to the
    # claim. The unsteered default model agrees with it (it disagrees on 0.40 of that half's report split), while on
    # the political-typology half, where it would have to infer a view from a persona, it is at chance.
    "no-sycophancy": {
        "data": "caa/sycophancy_stated_view.json",
        "task": "ab",
        **LONG_PROMPTS,
        "toward": "not-matching",
        "description": "does not just agree with the user's stated view (CAA sycophancy, steered away)",
    },
    "no-hallucination": {
        "data": "caa/hallucination_generate.json",
        "task": "ab",
        **LONG_PROMPTS,
        "toward": "not-matching",
        "description": "rejects false premises instead of inventing facts (CAA hallucination, steered away)",
    },
}


def commands(name: str, out_dir: Path, alphas: str | None = None, windows: str | None = None) -> list[list[str]]:
    """The recipe's `vectors` and `tune` argument lists; `alphas` (the bisection's bracket) and `windows`
    override its search."""
    recipe = RECIPES[name]
    profile = str(out_dir / f"{name}.safetensors")
    data = str(data_file(recipe["data"]))
    vectors = [
        "vectors",
        "--data",
        data,
        "--method",
        "grains",
        "--out",
        profile,
        "--limit",
        str(recipe["limit"]),
        "--toward",
        recipe["toward"],
        "--description",
        recipe["description"],
    ]
    if "ig_steps" in recipe:
        vectors += ["--ig-steps", str(recipe["ig_steps"])]
    tune = [
        "tune",
        "--profile",
        profile,
        "--task",
        recipe["task"],
        "--data",
        data,
        "--toward",
        recipe["toward"],
        "--ppl-data",
        str(data_file(DOLLY)),
        "--windows",
        windows or recipe["windows"],
        "--limit",
        str(recipe["tune_limit"]),
        "--ppl-limit",
        str(recipe["ppl_limit"]),
    ]
    if alphas:
        tune += ["--alphas", alphas]
    if recipe["task"] == "ab":
        tune += ["--mmlu", str(data_file("caa/mmlu_ab_dev.json"))]
    return [vectors, tune]


def register(subparsers) -> None:
    parser = subparsers.add_parser("builtins", help="rebuild the built-in profiles (GRAINS vectors + tuning)")
    parser.add_argument("--only", choices=sorted(RECIPES), action="append", help="just this profile (repeatable)")
    parser.add_argument("--out-dir", default=None, help="where to write (default: the user profiles folder)")
    parser.add_argument("--alphas", default=None, help="override every recipe's α bracket (smallest,largest)")
    parser.add_argument("--windows", default=None, help="override every recipe's layer windows (';'-separated)")
    parser.add_argument("--print", action="store_true", help="print the commands instead of running them")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from grains_edge import paths
    from grains_edge.cli import main

    out_dir = Path(args.out_dir).expanduser() if args.out_dir else paths.profiles_dir()
    for name in args.only or sorted(RECIPES):
        for command in commands(name, out_dir, args.alphas, args.windows):
            if args.print:
                print("grains-edge " + shlex.join(command))
            elif main(command) != 0:
                return 2
    return 0
