"""`grains-edge tune`: choose a profile's layers and strength on the tune split, capability checked.

For each layer window and alpha, the behaviour metric (TruthfulQA MC1 or the A/B matching rate) is
measured on the tune split with the profile applied; a configuration is admissible when the response
perplexity on Dolly rises by at most 3 % (and, with --mmlu, 2-choice MMLU drops by at most 1 point).
The perplexity check reads every Dolly response outside the report split (train + tune, about 150):
the Dolly train part is never used for vectors, and on the tune part alone (28 responses) a +2.0 %
became +3.7 % on the report split.
The best admissible configuration is written into the profile with the whole sweep table; ties of
the metric (frequent on a few dozen items) go to MC2 or the mean log-prob margin, then to the smaller α.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from grains_edge.options import SCORES, TOWARD, finite_floats

PPL_BUDGET = 1.03
MMLU_BUDGET = 0.01


def register(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="choose layers and alpha for a profile on a validation split")
    parser.add_argument("--profile", required=True, help="profile name or path (updated in place)")
    parser.add_argument("--task", required=True, choices=("truthfulqa", "ab"))
    parser.add_argument("--data", required=True, help="the behaviour data the profile was built from")
    parser.add_argument("--ppl-data", required=True, help="Dolly JSONL for the perplexity check")
    parser.add_argument("--mmlu", default=None, help="2-choice MMLU JSON for the capability check (optional)")
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--alphas", type=finite_floats, default="0.005,0.01,0.02,0.03", help="strengths, in hidden-state norms"
    )
    parser.add_argument("--windows", default="auto", help="auto, or layer specs separated by ';' (e.g. 0-9;10-19;all)")
    parser.add_argument("--score", default="text", choices=SCORES)
    parser.add_argument("--toward", default="matching", choices=TOWARD)
    parser.add_argument("--limit", type=int, default=None, help="at most N tune items")
    parser.add_argument("--ppl-limit", type=int, default=None, help="at most N Dolly responses")
    parser.add_argument("--report", default=None, help="also write the sweep as JSON here")
    parser.set_defaults(run=run)


def auto_windows(num_layers: int) -> list[str]:
    third = num_layers // 3
    windows = [f"{start}-{min(num_layers, start + third) - 1}" for start in range(0, num_layers - third + 1, third)]
    return windows + [f"{num_layers // 4}-{3 * num_layers // 4 - 1}", "all"]


def run(args: argparse.Namespace) -> int:
    from grains_edge.evaluate import datasets, scoring
    from grains_edge.layers import parse_layers
    from grains_edge.runtime.bootstrap import ensure_export
    from grains_edge.runtime.engine import Engine
    from grains_edge.steer.profiles import load_profile, save_profile, steering_tensor

    datasets.check_limit(args.limit)
    datasets.check_limit(args.ppl_limit, "--ppl-limit")
    engine = Engine(ensure_export(args.model))
    profile = load_profile(args.profile)
    alphas = args.alphas
    windows = auto_windows(engine.num_layers) if args.windows == "auto" else args.windows.split(";")
    skipped = {}  # per item set: how many are longer than the model's context (left out)
    if args.task == "truthfulqa":
        mc1, mc2 = datasets.load_truthfulqa(args.data)
        both = zip(
            datasets.select(mc1, "tune", lambda i: i.question, args.limit, args.data),
            datasets.select(mc2, "tune", lambda i: i.question, args.limit),
            strict=True,
        )
        questions, skipped["tune"] = scoring.fitting(engine, list(both), scoring.mc_sequences)
        items, items2 = [q for q, _ in questions], [q for _, q in questions]

        def behaviour(steering) -> tuple[float, float]:
            """(MC1, MC2): MC2, continuous, breaks the ties of MC1 on a small split."""
            result = scoring.truthfulqa(engine, items, items2, steering)
            return result["mc1"], result["mc2"]
    else:
        items = datasets.select(
            datasets.load_ab(args.data, args.score, args.toward), "tune", lambda i: i.question, args.limit, args.data
        )
        items, skipped["tune"] = scoring.fitting(engine, items, scoring.ab_sequences)

        def behaviour(steering) -> tuple[float, float]:
            """(matching rate, mean log-prob margin): the margin breaks ties of the rate."""
            result = scoring.ab_preference(engine, items, steering)
            return result["matching_rate"], result["mean_logprob_margin"]

    prompts, responses = datasets.load_dolly(args.ppl_data)
    dolly = datasets.select(
        list(zip(prompts, responses, strict=True)), "train+tune", lambda item: item[0], args.ppl_limit, args.ppl_data
    )
    dolly, skipped["ppl"] = scoring.fitting(engine, dolly, lambda item: [item])
    mmlu = (
        datasets.select(datasets.load_ab(args.mmlu, "text"), "tune", lambda i: i.question, None, args.mmlu)
        if args.mmlu
        else []
    )
    mmlu, skipped["mmlu"] = scoring.fitting(engine, mmlu, scoring.ab_sequences)
    if any(skipped.values()):
        print(
            f"[grains-edge] left out items longer than the model's context ({engine.max_context} tokens): {skipped}",
            file=sys.stderr,
        )

    def measure(steering) -> dict:
        primary, secondary = behaviour(steering)
        row = {"behaviour": primary, "tie_break": secondary}
        row["ppl"] = scoring.perplexity(engine, [p for p, _ in dolly], [r for _, r in dolly], steering)["perplexity"]
        if mmlu:
            row["mmlu"] = scoring.ab_preference(engine, mmlu, steering)["matching_rate"]
        return row

    started = time.perf_counter()
    base = measure(None)
    print(f"unsteered: {base}", flush=True)
    rows = []
    for window in windows:
        windowed = dataclasses.replace(profile, layers=parse_layers(window, engine.num_layers))
        for alpha in alphas:
            row = {"layers": window, "alpha": alpha}
            try:
                row.update(measure(steering_tensor(windowed, alpha)))
                row["admissible"] = row["ppl"] <= base["ppl"] * PPL_BUDGET and (
                    not mmlu or row["mmlu"] >= base["mmlu"] - MMLU_BUDGET
                )
            except scoring.NonFiniteScores as error:  # a setting too strong to score is not admissible
                row.update(error=str(error), admissible=False)
            rows.append(row)
            print(scoring.finite_json(row), flush=True)
    admissible = [r for r in rows if r["admissible"]]
    best = max(admissible, key=lambda r: (r["behaviour"], r["tie_break"], -r["alpha"])) if admissible else None
    report = {
        "task": args.task,
        "tune_items": len(items),
        "ppl_items": len(dolly),
        "skipped_too_long": skipped,
        "unsteered": base,
        "sweep": rows,
        "chosen": best,
        "seconds": round(time.perf_counter() - started),
    }
    if best is not None:
        profile.layers = parse_layers(best["layers"], engine.num_layers)
        profile.alpha = best["alpha"]
    else:
        print(
            "[grains-edge] no setting passed the capability check (perplexity +3 %, MMLU-AB -1 point); the profile "
            f"keeps α {profile.alpha:g}; fix: try smaller --alphas or other --windows",
            file=sys.stderr,
        )
    profile.metadata["tuning"] = scoring.finite_json(report)
    save_profile(profile, profile.path)
    if args.report:
        with open(args.report, "w") as handle:
            handle.write(scoring.finite_json(report, indent=2))
    print(scoring.finite_json({"chosen": best, "unsteered": base, "profile": str(profile.path)}, indent=2))
    return 0
