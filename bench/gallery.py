"""The answer gallery: for each built-in profile, the first three report-split prompts of its own data,
answered greedily without and with the profile (as the chat's compare mode shows them).

The prompts are held out from the vectors and the tuning; a CAA item's "Choices: (A) … (B) …" is cut, so the
model answers the bare request. Writes the answers as JSON and as a Markdown table for the README.

    python bench/gallery.py --out bench/results/gallery.json      # + gallery.md beside it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from report import machine, publish

from grains_edge.commands.builtins import RECIPES
from grains_edge.data import data_file
from grains_edge.evaluate import datasets

PROMPTS_PER_PROFILE = 3


def report_prompts(name: str, count: int) -> list[str]:
    """The first `count` report-split questions of the profile's data, without A/B choices."""
    recipe = RECIPES[name]
    path = data_file(recipe["data"])
    if recipe["task"] == "truthfulqa":
        items = datasets.load_truthfulqa(path)[0]
    else:
        items = datasets.load_ab(path, "text", recipe["toward"])
    chosen = datasets.select(items, "report", lambda item: item.question, count, str(path))
    return [item.question.split("\n\nChoices:")[0].strip() for item in chosen]


def answer(engine, prompt: str, steering, settings) -> str:
    return "".join(engine.chat([{"role": "user", "content": prompt}], steering, settings)).strip()


def markdown(rows: list[dict]) -> str:
    """One table per profile: prompt | unsteered | steered."""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = []
    for name in dict.fromkeys(row["profile"] for row in rows):
        chosen = next(row for row in rows if row["profile"] == name)
        lines += [f"**`{name}`** (layers {chosen['layers']}, α {chosen['alpha']:.3g})", ""]
        lines += ["| prompt (report split) | unsteered | steered |", "|---|---|---|"]
        lines += [
            f"| {cell(row['prompt'])} | {cell(row['unsteered'])} | {cell(row['steered'])} |"
            for row in rows
            if row["profile"] == name
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=60)
    parser.add_argument("--out", default=None, help="the JSON; the Markdown table goes beside it (.md)")
    args = parser.parse_args()

    from grains_edge.commands.profiles import layers_text
    from grains_edge.runtime.bootstrap import ensure_builtin_profiles, ensure_export
    from grains_edge.runtime.engine import Engine
    from grains_edge.runtime.protocol import GenerationSettings
    from grains_edge.steer.profiles import load_profile, steering_for

    engine = Engine(ensure_export(args.model), device="cpu")
    ensure_builtin_profiles(args.model)
    settings = GenerationSettings(args.max_tokens, repetition_penalty=1.1)  # the chat's defaults: greedy
    unsteered, _ = steering_for(engine, "none", None)
    rows = []
    for name in RECIPES:
        profile = load_profile(name)
        steered, _ = steering_for(engine, name, None)
        for prompt in report_prompts(name, PROMPTS_PER_PROFILE):
            rows.append(
                {
                    "profile": name,
                    "layers": layers_text(profile.layers),
                    "alpha": profile.alpha,
                    "prompt": prompt,
                    "unsteered": answer(engine, prompt, unsteered, settings),
                    "steered": answer(engine, prompt, steered, settings),
                }
            )
            print(f"[{name}] {prompt[:60]!r}", file=sys.stderr, flush=True)
    publish({"machine": machine(), "max_tokens": args.max_tokens, "rows": rows}, args.out)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
